"""The data layer: every format that lies on disk, and how it is read and written.

    brats, image_folders    a site's data as hospitals keep it (BraTS trees, 2-D image folders), checked on reading
    cache                   the prepared-slice cache (memory-mapped, keyed by the source files and settings)
    datasets                the one interface a site's data is used through (SiteDataset, open_dataset)
    label_map_bank          the server's bank of uploaded label maps (digest-named .npy files)
    checkpoint              the server's checkpoints (weights_only=True: no pickle)
    generator_file          the published generator (safetensors) and reading either form back
    public_start            the public pretraining folder and the public discriminator's file (safetensors, digest)

It imports only `common`; the server, the sites and the tools depend on it, never on each other.
"""
