"""Sharing caches: `export`, `pull`, `merge`."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, user_errors


@app.command()
@user_errors
def export(cache: str = typer.Argument(..., help="Cache path or URL."),
           out: str = typer.Argument(..., help="The file to write: NAME.zarr.zip."),
           epochs: Optional[str] = typer.Option(None, help="Only these epochs (0-9, 0,3,5-7); default all.")):
    """Write a cache (or some of its epochs) as one .zarr.zip, every file checked against its list."""
    from cskd_cache.cache.share import export as run

    r = run(cache, out, epochs)
    typer.echo(f"{out}: {r['files']} files, {r['bytes'] / 1e6:.1f} MB")


@app.command()
@user_errors
def pull(url: str = typer.Argument(..., help="Cache to copy: a path or URL (http(s)://, s3://, ..., .zarr.zip)."),
         local: str = typer.Argument(..., help="Local folder to copy it into."),
         epochs: Optional[str] = typer.Option(None, help="Only these epochs (0-9, 0,3,5-7); default all."),
         workers: int = typer.Option(8, min=1, help="Files fetched at once.")):
    """Copy all or some epochs of a cache, checking every file's sha256; run it again to resume. Pulling more
    epochs of the same cache into the same folder adds them to those it holds."""
    from cskd_cache.cache.share import pull as run

    from cskd_cache.cache.inspect import _ranges

    r = run(url, local, epochs, workers=workers)
    added = f" (added {_ranges(r['added']) or 'none'} to {_ranges(r['held_before'])})" if r["held_before"] else ""
    typer.echo(f"{local}: epochs {_ranges(r['epochs'])}{added}, {r['files']} files checked, "
               f"{r['bytes_fetched'] / 1e6:.1f} MB fetched")


@app.command()
@user_errors
def merge(caches: list[str] = typer.Argument(..., help="Caches of one plan with disjoint epochs."),
          out: str = typer.Option(..., "--out", "--output", help="The merged cache (a new folder).")):
    """Merge caches of the same plan whose epochs were computed apart (e.g. precompute --only-epochs)."""
    from cskd_cache.cache.share import merge as run

    r = run(caches, out)
    state = "complete" if r["complete"] else f"partial ({len(r['epochs'])} of {r['of']} epochs)"
    typer.echo(f"{out}: {state}")
