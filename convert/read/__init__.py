"""Reading: Keras files (and zoo.toml, labels) into the neutral graph.

h5py and numpy only: no TensorFlow, no coremltools, nothing from the stages after it. A file
that cannot be read is a :class:`convert.errors.ModelFileError` naming the file.
"""
