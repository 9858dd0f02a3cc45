"""What a researcher runs with a trained generator (installed as `asyndgan.synthesis`), kept apart from what runs
at a hospital (site_agent) and from the demo data generators (demo_data).

    generator_file.py  a generator from a server checkpoint or from a published `.safetensors` export (weights
                       and model settings only); `export_generator` writes the latter
    label_sources.py   the label maps to generate from: the run's own bank, a BraTS tree's segmentations, or
                       2-D mask files, each made exactly as the sites made them for training
    writers.py         synthetic cases in BraTS layout (NIfTI) and 2-D files, each written into a temporary
                       folder or name and renamed when complete, with provenance
    generate.py        `asyndgan generate`: settings, and the loop that ties the three together
"""
