"""The package shadows the standard library's `ssl`; it must stay a complete superset of it."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO_ROOT

CHECK = """
import ssl
assert ssl.__file__.endswith("ssl/__init__.py"), ssl.__file__
ctx = ssl.create_default_context()
assert isinstance(ctx, ssl.SSLContext)
assert ssl.OPENSSL_VERSION and ssl.PROTOCOL_TLS_CLIENT and ssl.CERT_REQUIRED
import urllib3, requests, wandb, timm
import ssl.pretrain, ssl.objectives
print("ok")
"""


def test_repo_ssl_is_superset_of_stdlib_and_clients_import() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_every_public_stdlib_name_is_present() -> None:
    stdlib_source = Path(sysconfig.get_paths()["stdlib"], "ssl.py").read_text()
    namespace: dict = {}
    exec(compile(stdlib_source, "ssl.py", "exec"), namespace)
    code = (
        "import ssl, json; print(json.dumps(sorted(n for n in dir(ssl) if not n.startswith('__'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    ours = set(__import__("json").loads(out.stdout))
    missing = {n for n in namespace if not n.startswith("__")} - ours
    assert not missing, f"names of the standard ssl module missing from the package: {missing}"


def test_outside_the_repository_the_standard_library_ssl_is_untouched(tmp_path: Path) -> None:
    """Installing the project (pip install -e .) must not hijack `import ssl` elsewhere."""
    out = subprocess.run(
        [sys.executable, "-c", "import ssl; print(ssl.__file__)"], cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == Path(sysconfig.get_paths()["stdlib"], "ssl.py")
