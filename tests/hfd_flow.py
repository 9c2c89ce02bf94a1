"""What hfd.sh (hf-mirror.com's downloader) asks of an endpoint, with the real aria2c and wget.

hfd.sh is a public shell script (github gist padeoe/697678ab8e528b85a2a7bddafea1fa4f); its text
is not ours to commit, so this module makes the same requests with the same tools and options,
step by step, as its current version does:

1. ``curl -L`` the repo info, ``{endpoint}/api/{models|datasets}/{repo}`` (``/revision/{rev}``
   appended unless the revision is ``main``), with ``Authorization: Bearer`` for ``--hf_token``.
2. Keep each ``siblings[].rfilename`` that matches an ``--include`` glob (``.`` escaped, ``*``
   as ``.*``, searched anywhere in the name) and no ``--exclude`` glob.
3. aria2c (the default tool): an input file with, per file, the resolve URL
   ``{endpoint}/{datasets/}{repo}/resolve/{rev}/{rfilename}`` (the name as it is, unencoded),
   `` dir=`` its folder, `` out=`` its base name and, with a token,
   `` header=Authorization: Bearer ...``; run as ``aria2c --console-log-level=error
   --file-allocation=none -x 4 -j 5 -s 4 -k 1M -c -i LIST --save-session=LIST``.
   wget: a list of the same URLs, run as ``wget -x -nH --cut-dirs=4`` (5 for datasets),
   ``--header=Authorization: Bearer ...`` with a token, ``--input-file=LIST --continue``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tool_world import report, run_tool

Tool = Literal["aria2c", "wget"]


def _pattern(globs: Sequence[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(g.replace(".", r"\.").replace("*", ".*") for g in globs))


def hfd(
    endpoint: str,
    repo_id: str,
    local_dir: Path,
    *,
    tool: Tool = "aria2c",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    revision: str = "main",
    dataset: bool = False,
    token: str | None = None,
) -> list[str]:
    """Download as ``hfd.sh REPO_ID --local-dir DIR`` with those options; the files listed.

    Raises AssertionError, with the tool's output, when a step fails.
    """
    meta = local_dir / ".hfd"
    meta.mkdir(parents=True, exist_ok=True)
    api = f"{endpoint}/api/{'datasets' if dataset else 'models'}/{repo_id}"
    if revision != "main":
        api += f"/revision/{revision}"
    auth = [] if token is None else ["-H", f"Authorization: Bearer {token}"]
    listing = run_tool(["curl", "-L", "-s", "-o", str(meta / "repo_metadata.json"), *auth, api])
    assert listing.returncode == 0, report(listing)
    siblings = json.loads((meta / "repo_metadata.json").read_text())["siblings"]
    wanted, unwanted = _pattern(include), _pattern(exclude)
    files = [
        s["rfilename"] for s in siblings
        if (wanted is None or wanted.search(s["rfilename"]))
        and not (unwanted is not None and unwanted.search(s["rfilename"]))
    ]  # fmt: skip
    base = f"{endpoint}/{'datasets/' if dataset else ''}{repo_id}/resolve/{revision}"
    run = _download(tool, base, files, local_dir, token, cut_dirs=5 if dataset else 4)
    assert run.returncode == 0, report(run)
    return files


def _download(
    tool: Tool, base: str, files: list[str], local_dir: Path, token: str | None, cut_dirs: int
) -> subprocess.CompletedProcess[str]:
    listing = local_dir / ".hfd" / f"{tool}_urls.txt"
    if tool == "aria2c":
        lines = []
        for name in files:
            folder, _, leaf = name.rpartition("/")
            lines += [f"{base}/{name}", f" dir={folder}", f" out={leaf}"]
            if token is not None:
                lines.append(f" header=Authorization: Bearer {token}")
            lines.append("")
        listing.write_text("\n".join(lines) + "\n")
        return run_tool(
            ["aria2c", "--console-log-level=error", "--file-allocation=none", "-x", "4", "-j",
             "5", "-s", "4", "-k", "1M", "-c", "-i", str(listing),
             f"--save-session={listing}"],
            cwd=local_dir,
        )  # fmt: skip
    listing.write_text("".join(f"{base}/{name}\n" for name in files))
    auth = [] if token is None else [f"--header=Authorization: Bearer {token}"]
    return run_tool(
        ["wget", "-x", "-nH", f"--cut-dirs={cut_dirs}", *auth, f"--input-file={listing}",
         "--continue"],
        cwd=local_dir,
    )  # fmt: skip
