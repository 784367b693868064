"""Stage implementations: one function per DVC stage, shared by ``dvc repro`` and the CLI.

Each stage takes the validated :class:`~blueglass.config.Params` and the folder the params file lives in
(all relative paths resolve against it), does its work, writes its outputs atomically plus a small
``metrics/<stage>.json``, and logs one MLflow run.
"""
