"""Operate TorchServe for this bundle: settings, config files, server control, the management API,
archives, the promotion gate and version history. Training (train/) and the served model code
(model_src/) never import this package, except `bundle.settings` for paths."""
