"""Images in: the dataset registry, the built-in file formats, image folders, decoding,
and the sources that hand the trainer reproducible batches."""
