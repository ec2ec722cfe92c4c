"""Always collected: without a diffusers checkout, the one test that says why the mixin tests did not run; with one,
a check that `tests` is the checkout's package and not this repository's test folder of the same name."""

import os


def test_tests_package_is_the_diffusers_checkout(diffusers_tests):
    import tests.testing_utils

    assert os.path.realpath(tests.testing_utils.__file__) == os.path.join(diffusers_tests, "tests", "testing_utils.py")
