"""One module per method or baseline (with one config, conf/method/<name>.yaml). The protocol every method answers,
and how a new one is added, is in base.py."""
