"""The test session's preset cache: never the user's VLMPRUNE_CACHE, and removed when the session ends (README,
"Quickstart": "the tests use a temporary one")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import os
def test_probe():
    print("CACHE=" + os.environ["VLMPRUNE_CACHE"])
    os.makedirs(os.path.join(os.environ["VLMPRUNE_CACHE"], "presets", "probe"), exist_ok=True)
'''


def _session(tmp_path: Path, env: dict) -> str:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return next(line for line in done.stdout.splitlines() if "CACHE=" in line).split("CACHE=", 1)[1].strip()


def test_the_users_cache_is_untouched_and_the_session_cache_removed(tmp_path):
    user = tmp_path / "user-cache"
    user.mkdir()
    work = tmp_path / "session"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VLMPRUNE_CACHE", "VLMPRUNE_TEST_CACHE")}
    used = _session(work, {**env, "VLMPRUNE_CACHE": str(user)})
    assert Path(used) != user and list(user.iterdir()) == []
    assert not Path(used).exists()  # removed at the end of the session
    kept = tmp_path / "kept"
    used = _session(work, {**env, "VLMPRUNE_CACHE": str(user), "VLMPRUNE_TEST_CACHE": str(kept)})
    assert Path(used) == kept and (kept / "presets" / "probe").is_dir()  # asked to keep: kept
