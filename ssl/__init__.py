"""`ssl` is a superset of the standard library's `ssl` module.

`python -m ssl.pretrain` puts the repository root first on `sys.path`, so this package shadows
the standard library's `ssl`. urllib3, requests, wandb and timm import `ssl` and need the real
one, so the standard-library source is executed into this namespace; `__path__` stays ours so
that `ssl.pretrain`, `ssl.objectives`, ... still import as subpackages. Nothing else lives here.
"""

import os as _os
import sysconfig as _sysconfig

_STDLIB_SSL = _os.path.join(_sysconfig.get_paths()["stdlib"], "ssl.py")
with open(_STDLIB_SSL, encoding="utf-8") as _source:
    exec(compile(_source.read(), _STDLIB_SSL, "exec"))
del _source
