"""The architecture sweep of tests/test_architectures.py on its slow architectures (ResNet50,
ResNet50V2, DenseNet121, InceptionV3, Xception, NASNetMobile): the same tests and fixture, in a
file of its own so that the two workers of ``make test`` share the sweep."""

from __future__ import annotations

from test_architectures import (  # noqa: F401  (the tests, their fixture and their parameters)
    ARCHS,
    SLOW,
    pytest_generate_tests,
    run,
    test_backbone_builder,
    test_classifiers_match_keras,
    test_convert,
    test_direct_backbone_matches_coremltools,
    test_outputs_are_byte_identical_to_the_recorded_ones,
    test_plan_infers_family_and_preprocessing,
)

SWEEP = [p for p in ARCHS if p.values[0] in SLOW]
