"""Render every built-in recipe's ``--quick`` report in headless Chromium and check that it fits.

For each recipe this runs ``poise run RECIPE --quick`` into ``OUT/RECIPE`` (or reuses a finished run
there with ``--reuse``), opens ``report.html`` in headless Chromium at each width (1024 and 1440 px by
default) and fails when

* the page scrolls sideways (anything wider than the window that is not inside its own scroll box),
* a table overflows the window outside a scroll box, or an image is wider than the window,
* an image fails to load (no pixels).

It writes a screenshot per recipe and width (``OUT/shots/RECIPE-WIDTH.png``) and a verdict table
(``OUT/verdict.md``), and exits 1 if any check fails. ``--screenshot PATH`` also runs the default
study at full size and saves a screenshot of its report to PATH (the picture in the README:
``docs/report-default.png``).

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``workbench`` extra.

    python scripts/check_reports.py                      # every built-in recipe, quick
    python scripts/check_reports.py --recipes tiny rl-stability --widths 1024
    python scripts/check_reports.py --recipes tiny --screenshot docs/report-default.png
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in the page after load; its JSON result replaces the <pre id="poise-check"> text.
_CHECK = """<script>
window.addEventListener('load', () => {
  const W = document.documentElement.clientWidth, bad = [];
  if (document.documentElement.scrollWidth > W + 1)
    bad.push('page scrolls sideways: ' + document.documentElement.scrollWidth + ' px wide in ' + W + ' px');
  const inScroll = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const s = getComputedStyle(p).overflowX; if (s === 'auto' || s === 'scroll') return p; } return null; };
  document.querySelectorAll('table').forEach((t, i) => {
    const box = inScroll(t), r = (box || t).getBoundingClientRect();
    if (r.right > W + 1) bad.push('table ' + i + (box ? ' (its scroll box)' : '') + ' ends at ' +
                                  Math.round(r.right) + ' px');
  });
  document.querySelectorAll('img').forEach((im, i) => {
    if (!im.complete || im.naturalWidth === 0) bad.push('image ' + i + ' (' + im.alt + ') did not load');
    else if (im.getBoundingClientRect().right > W + 1) bad.push('image ' + i + ' (' + im.alt + ') overflows');
  });
  const pre = document.createElement('pre'); pre.id = 'poise-check';
  pre.textContent = JSON.stringify({width: W, tables: document.querySelectorAll('table').length,
                                    images: document.querySelectorAll('img').length, problems: bad});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("check_reports: no chromium found; install it (apt-get install chromium)")


def _flags(width: int, height: int) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
            "--virtual-time-budget=5000"]


def check_page(report: Path, width: int, chromium: str) -> dict:
    """The in-page checks of ``report`` at ``width`` px: ``{width, tables, images, problems}``."""
    page = report.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.replace("</body>", _CHECK + "</body>"))
        out = subprocess.run([chromium, *_flags(width, 900), "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="poise-check">(.*?)</pre>', out.stdout, re.S)
    if not m:
        return {"width": width, "tables": 0, "images": 0,
                "problems": [f"chromium gave no result (exit {out.returncode}): {out.stderr.strip()[-300:]}"]}
    import html

    return json.loads(html.unescape(m.group(1)))


def screenshot(report: Path, width: int, height: int, dest: Path, chromium: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, *_flags(width, height), f"--screenshot={dest.resolve()}", report.resolve().as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)


def _run(recipe: str, run_dir: Path, quick: bool) -> float:
    import time

    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "poise.cli", "run", recipe, "--run-dir", str(run_dir), "--no-progress"]
    subprocess.run([*cmd, "--quick"] if quick else cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from poise.runs.config import recipe_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/report-check", help="folder for the runs, screenshots and verdict")
    ap.add_argument("--recipes", nargs="*", default=None, help="built-in recipes (default: all)")
    ap.add_argument("--widths", nargs="*", type=int, default=[1024, 1440])
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs under OUT instead of running again")
    ap.add_argument("--screenshot", default=None, metavar="PATH",
                    help="also run the default study at full size and save its report's screenshot here")
    args = ap.parse_args(argv)
    chromium = _chromium()
    out = Path(args.out)
    rows, failed = [], 0
    for recipe in args.recipes or recipe_names():
        run_dir = out / recipe
        seconds = None
        if not (args.reuse and (run_dir / "report.html").is_file()):
            seconds = _run(recipe, run_dir, quick=True)
        for width in args.widths:
            res = check_page(run_dir / "report.html", width, chromium)
            shot = out / "shots" / f"{recipe}-{width}.png"
            screenshot(run_dir / "report.html", width, 3000, shot, chromium)
            ok = not res["problems"]
            failed += not ok
            rows.append((recipe, width, res["tables"], res["images"], "ok" if ok else "; ".join(res["problems"]),
                         seconds))
            print(f"{recipe:22s} {width:5d} px  {res['tables']:2d} tables {res['images']:2d} images  "
                  f"{'ok' if ok else 'FAIL: ' + '; '.join(res['problems'])}", flush=True)
    if args.screenshot:
        run_dir = out / "default-full"
        if not (args.reuse and (run_dir / "report.html").is_file()):
            _run("stability-gap", run_dir, quick=False)
        screenshot(run_dir / "report.html", 1024, 2400, Path(args.screenshot), chromium)
        print(f"screenshot of the default report: {args.screenshot}")
    lines = ["| recipe | width (px) | tables | images | verdict | quick run (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {w} | {t} | {i} | {v} | {'' if s is None else f'{s:.0f}'} |" for r, w, t, i, v, s in rows]
    (out / "verdict.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "verdict.md").write_text("\n".join(lines) + "\n")
    print(f"\n{len(rows) - failed}/{len(rows)} pages fit; screenshots in {out / 'shots'}; "
          f"table in {out / 'verdict.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
