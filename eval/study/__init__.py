"""A human study kit (issue 19): build a study from run folders (``build``), run it as a local web app (``app``,
votes in SQLite via ``store``), analyse the votes (``analysis``: Table 3, Krippendorff's alpha, metric-human
agreement). Reads run folders through ``runfolder`` only."""
