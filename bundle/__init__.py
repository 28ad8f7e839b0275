"""The bottom of the bundle: where things are (settings) and how TorchServe's .properties files read. Every
other package imports from here; this package imports nothing of them."""
