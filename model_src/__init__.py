"""Model code that is both trained and served.

Everything in this package is shipped inside the .mar archive, so it must not
import training-only code (losses, optimisers, data loading).
"""
