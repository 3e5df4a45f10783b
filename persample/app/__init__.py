"""The digits application, apart from the library: the ``persample`` command line, DP training of a small CNN on
scikit-learn's bundled digits, and the run's report."""
