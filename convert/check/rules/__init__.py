"""Core ML's validation rules, split the way ``mlmodel/src/Validation`` in apple/coremltools is:
one module per validator file (PipelineValidator.cpp, LinkedModelValidator.cpp,
NeuralNetwork/NeuralNetworkValidator.cpp, ...), with :mod:`convert.check.validate` as the
dispatcher that, like Model.cpp, picks the rules by the spec's model type.
"""
