"""What a run is asked to do: ``TrainConfig``, every setting's type, default, range,
recipe and resume rule."""
