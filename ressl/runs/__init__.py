"""The run folder and what it holds: the checkpoint format and its checks, the folder's
files and lock, where a run is, and a run's backbone as plain weights."""
