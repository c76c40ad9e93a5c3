"""Each recipe's registered default rates, written out once for the tests:
``(learning_rate, adam_learning_rate)``, the sweep's choices (README;
tests/test_defaults.py checks them against results/sweep). Each AdamW branch
runs at 3e-3 at its recipe's default rate, DCT-AdamW's at 0.0085 (at 3e-3 its
d 128 runs end 3% higher); adamw and spectra have no separate branch."""

DEFAULT_LEARNING_RATES = {
    'adamw': (3e-3, None),
    'muon': (0.05656, 3e-3),
    'normuon': (0.05656, 3e-3),
    'namo': (0.22624, 3e-3),
    'namo_d': (0.22, 3e-3),
    'lanton': (0.08, 3e-3),
    'root': (0.05656, 3e-3),
    'auon': (0.08, 3e-3),
    'hybrid_auon': (0.056, 3e-3),
    'spectra': (0.0424, None),
    'fismo': (0.056, 3e-3),
    'aro': (0.08, 3e-3),
    'dct_adamw': (1.5, 0.0085),
    'trion': (0.226, 3e-3),
}
