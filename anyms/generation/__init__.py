"""The generation stage: a Hydra config -> images and records in a run folder (generate.py); images made elsewhere
imported into one (importer.py)."""
