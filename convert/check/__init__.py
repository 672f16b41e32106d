"""Checking: Core ML's validation rules, the reference evaluator, and verify against Keras.

Never imports :mod:`convert.build`: what checks the output must not share code with what wrote it.
"""
