"""Data-set generators for demos and tests: the MNI152-based brain-tumour phantom (`phantom/`) and the tiny toy
sets (`toy.py`). These make stand-in *input* data for sites; they are not the trained generator's synthetic
output, and nothing here runs at a hospital (the site agent never imports this package)."""
