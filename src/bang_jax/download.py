"""Fetches the official dataset files so :func:`bang_jax.load_dataset` can read them.

From the command line::

    python -m bang_jax.data download mnist            # or fashion_mnist, cifar10
    python -m bang_jax.data download bang_caffe       # the authors' four released Caffe weight files
    python -m bang_jax.data download cifar10 --dir ~/data
    export BANG_DATA_DIR=~/data                       # what load_mnist() & co. and the experiments read

Each file is fetched from its publisher's location first and from well-known mirrors after it (the same bytes;
the checksum decides, not the host), with a progress bar. A download is written to ``<file>.part`` and moved
into place only once its contents pass the same SHA-256 check the loaders make (the table in
:mod:`bang_jax.data`), so a half-written or wrong file is never left where the loaders look. A cut download —
a dropped connection or a killed process — resumes from where it stopped with an HTTP ``Range`` request. Files
that are already there and verify are not fetched again.

What ends up where (``DIR`` is ``--dir``, else ``$BANG_DATA_DIR``, else ``./data``):

* ``DIR/mnist/`` and ``DIR/fashion_mnist/``: the four IDX files, gzipped as published
  (``train-images-idx3-ubyte.gz`` …);
* ``DIR/cifar10/``: ``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin`` and ``batches.meta.txt``,
  taken out of the published ``cifar-10-binary.tar.gz`` (the archive is deleted once they verify);
* ``DIR/bang_caffe/``: the BANG authors' released weights (LeNet R0 and B1, CIFAR-10-quick R0 and B0,
  ``*.caffemodel.h5``) from their Caffe fork on GitHub, pinned to the commit that added them, each checked against
  the SHA-256 in :data:`bang_jax.caffe.RELEASED_WEIGHTS`; read them with ``python -m bang_jax.evaluate
  --caffe-weights DIR/bang_caffe/lenet_bang.caffemodel.h5``.

A download that fails removes the folders it created (a cut file's ``.part`` stays, to resume from).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from bang_jax import data as data_lib

__all__ = ["SOURCES", "DownloadError", "Source", "download", "main"]

_USER_AGENT = "bang-jax-download/0.1 (+python urllib)"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A file could not be fetched from any location, or what was fetched failed its checksum."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a dataset's published files live.

    Attributes:
      files: the file names on the server.
      urls: base URLs (ending in ``/``), tried in order: the publisher's first, then mirrors.
      archive_dir: for an archive (CIFAR-10), the folder inside it that holds the data files.
      extra_members: archive members copied without a checksum (CIFAR-10's class names).
      raw: the files are checked as they are (not gunzipped), against ``checksums`` keyed by their base name;
        ``files`` may then hold sub-paths of the base URL (saved under their base name).
    """

    files: tuple[str, ...]
    urls: tuple[str, ...]
    archive_dir: str | None = None
    extra_members: tuple[str, ...] = ()
    raw: bool = False


_CAFFE_COMMIT = "a63bc240a38454e6a70dbfe4324151045d7efcb4"
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz")

SOURCES: dict[str, Source] = {
    # LeCun, Cortes, Burges: the MNIST page; then the mirrors PyTorch and TensorFlow use for the same files.
    "mnist": Source(_IDX_FILES, (
        "https://yann.lecun.com/exdb/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    )),
    # Zalando Research: the bucket the Fashion-MNIST README links to; then the files in its GitHub repository.
    "fashion_mnist": Source(_IDX_FILES, (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    )),
    # Krizhevsky: the "CIFAR-10 binary version" on the CIFAR page.
    "cifar10": Source(("cifar-10-binary.tar.gz",), ("https://www.cs.toronto.edu/~kriz/",),
                      archive_dir="cifar-10-batches-bin", extra_members=("batches.meta.txt",)),
    # Rozsa et al.: their Caffe fork on GitHub, at the commit that added BANG and the released models.
    "bang_caffe": Source(
        ("models/mnist/lenet.caffemodel.h5", "models/mnist/lenet_bang.caffemodel.h5",
         "models/cifar10/cifar10.caffemodel.h5", "models/cifar10/cifar10_bang.caffemodel.h5"),
        (f"https://raw.githubusercontent.com/arozsa23/caffe/{_CAFFE_COMMIT}/",
         f"https://github.com/arozsa23/caffe/raw/{_CAFFE_COMMIT}/"),
        raw=True),
}


def _checksums(name: str) -> dict[str, str]:
    if name == "bang_caffe":
        from bang_jax.caffe import RELEASED_WEIGHTS  # noqa: PLC0415

        return {file: digest for file, (digest, _) in RELEASED_WEIGHTS.items()}
    return dict(data_lib._CHECKSUMS[name])


def _default_dir() -> Path:
    return data_lib.resolve_data_dir(None) or Path("data")


def _verify(path: Path, expected: str, *, gzipped: bool | None = None) -> None:
    """Raises :class:`DownloadError` unless the SHA-256 of ``path``'s contents (gunzipped if ``gzipped``; default:
    if its name ends in ``.gz``) is ``expected`` — the check the loaders make."""
    gzipped = path.name.endswith(".gz") if gzipped is None else gzipped
    try:
        raw = path.read_bytes()
        contents = gzip.decompress(raw) if gzipped else raw
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DownloadError(f"cannot read {path}: {err} (corrupt or truncated file)") from None
    digest = hashlib.sha256(contents).hexdigest()
    if digest != expected:
        raise DownloadError(f"checksum mismatch for {path.name}: the SHA-256 of its contents is {digest}, "
                            f"expected {expected} (corrupt, truncated or a different file)")


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, file=sys.stderr)


def _fetch(url: str, part: Path, *, desc: str, progress: bool, timeout: float, retries: int) -> None:
    """Downloads ``url`` into ``part``, continuing an existing ``part`` with a Range request.

    A connection that drops mid-way is picked up again where it stopped (``retries`` times). Raises
    ``urllib.error.URLError``/``OSError`` when the server cannot serve the file.
    """
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URLs only
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # nothing left to send: the part file is complete
                return
            raise
        with response:
            if offset and response.status != 206:  # the server ignored the Range header: start again
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            bar = _progress_bar(total, offset, desc, progress)
            received = offset
            try:
                with open(part, "ab" if offset else "wb") as f:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                if total is not None and received < total:
                    raise http.client.IncompleteRead(b"", total - received)
                return
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
                attempt += 1
                if attempt > retries:
                    raise OSError(f"connection cut after {received} of {total or '?'} bytes ({err!r}); run the "
                                  f"command again to resume from {part}") from err
                print(f"\n{desc}: connection cut after {received} bytes; resuming", file=sys.stderr)
                time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
            finally:
                if bar is not None:
                    bar.close()


def _fetch_verified(name: str, file: str, dest: Path, urls: Sequence[str], check, *, progress: bool,
                    timeout: float, retries: int) -> None:
    """Fetches ``file`` into ``dest`` from the first of ``urls`` that serves it and passes ``check(part)``."""
    part = dest.with_name(dest.name + ".part")
    errors = []
    for base in urls:
        url = base + file
        try:
            _fetch(url, part, desc=f"{name}/{file}", progress=progress, timeout=timeout, retries=retries)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            errors.append(f"{url}: {reason}")
            print(f"{name}/{file}: {url} failed ({reason})" + ("; trying the next location" if base != urls[-1]
                                                             else ""), file=sys.stderr)
            continue
        try:
            check(part)
        except DownloadError as err:
            part.unlink(missing_ok=True)  # a wrong file is never resumed from
            errors.append(f"{url}: {err}")
            print(f"{name}/{file}: {url} sent a file that fails its checksum; removed it", file=sys.stderr)
            continue
        os.replace(part, dest)
        return
    raise DownloadError(f"could not get {name} file {file}:\n  " + "\n  ".join(errors))


def download(name: str, directory: str | os.PathLike | None = None, *, urls: Sequence[str] | None = None,
             progress: bool = True, timeout: float = 60.0, retries: int = 3,
             checksums: Mapping[str, str] | None = None) -> Path:
    """Fetches and verifies ``name``'s official files into ``directory/name``; returns that folder.

    Args:
      name: ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'`` or ``'bang_caffe'`` (the authors' released weights).
      directory: the data root (default ``$BANG_DATA_DIR``, else ``./data``); the files go into its ``name``
        subfolder, where :func:`bang_jax.load_dataset` looks for them.
      urls: base URLs to try instead of :data:`SOURCES` (a private mirror, a test server).
      progress: show a progress bar per file.
      timeout: seconds to wait for a server.
      retries: how often a cut connection is resumed before giving up (a later call resumes too).
      checksums: SHA-256 per data file (decompressed), default the loaders' table; for tests and private files.

    Raises:
      DownloadError: a file could not be fetched from any URL, or failed its checksum everywhere.
    """
    name = name.lower().replace("-", "_")
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    urls = tuple(urls) if urls else source.urls
    urls = tuple(u if u.endswith("/") else u + "/" for u in urls)
    checksums = _checksums(name) if checksums is None else dict(checksums)
    target = Path(directory if directory is not None else _default_dir()).expanduser() / name
    created = [p for p in (target, *target.parents) if not p.exists()]  # removed again if the download fails
    target.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(name, source, target, urls, checksums,
                              dict(progress=progress, timeout=timeout, retries=retries))
    except BaseException:
        for folder in created:  # deepest first; a folder holding a .part to resume from stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _download_into(name, source, target: Path, urls, checksums, options) -> Path:
    if source.archive_dir is None:
        for file in source.files:
            base = Path(file).name
            dest = target / base
            expected = checksums[base if source.raw else file.removesuffix(".gz")]
            gzipped = not source.raw
            if dest.exists():
                try:
                    _verify(dest, expected, gzipped=gzipped and dest.name.endswith(".gz"))
                    print(f"{name}/{base}: already there, checksum ok", file=sys.stderr)
                    continue
                except DownloadError:
                    print(f"{name}/{base}: present but fails its checksum; fetching it again", file=sys.stderr)
            _fetch_verified(name, file, dest, urls, lambda p, e=expected, g=gzipped: _verify(p, e, gzipped=g),
                            **options)
        return target

    wanted = {f"{source.archive_dir}/{base}": base for base in checksums}
    present = [base for base in checksums if data_lib._find_file(target, base) is not None]
    try:
        for base in present:
            _verify(data_lib._find_file(target, base), checksums[base])
    except DownloadError:
        present = []
    if len(present) == len(checksums):
        print(f"{name}: all {len(present)} files already there, checksums ok", file=sys.stderr)
        return target
    (archive_name,) = source.files
    archive = target / archive_name

    def check_archive(path: Path) -> None:
        try:
            with tarfile.open(path, "r:gz") as tar:
                names = set(tar.getnames())
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DownloadError(f"{path} is not a readable .tar.gz ({err})") from None
        missing = sorted(set(wanted) - names)
        if missing:
            raise DownloadError(f"{path} lacks {missing}")

    if archive.exists():  # left by an earlier run that stopped while unpacking
        try:
            check_archive(archive)
        except DownloadError:
            archive.unlink()
    if not archive.exists():
        _fetch_verified(name, archive_name, archive, urls, check_archive, **options)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for member, base in list(wanted.items()) + [(f"{source.archive_dir}/{e}", e) for e in source.extra_members]:
            if member not in members:
                continue
            out = target / base
            tmp = out.with_name(out.name + ".part")
            with tar.extractfile(members[member]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if base in checksums:
                try:
                    _verify(tmp, checksums[base])
                except DownloadError as err:
                    tmp.unlink(missing_ok=True)
                    archive.unlink(missing_ok=True)
                    raise DownloadError(
                        f"{archive_name}: {err}; the archive was removed, run again to refetch it"
                    ) from None
            os.replace(tmp, out)
    archive.unlink()
    return target


def _unusable(root: Path) -> str | None:
    """Why files cannot be written under ``root`` (checked before any download), or None."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bang_jax.data download NAME [--dir DIR]``; returns the exit status (2 on a user error)."""
    p = argparse.ArgumentParser(
        prog="python -m bang_jax.data",
        description="Fetch the official MNIST, Fashion-MNIST or CIFAR-10 files, or the BANG authors' released "
                    "Caffe weights (bang_caffe), with a progress bar, SHA-256 checks and resumable downloads.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch and verify a dataset's official files")
    d.add_argument("datasets", nargs="+", metavar="NAME", help=f"{' | '.join(SOURCES)} (several allowed)")
    d.add_argument("--dir", help="data root (default: $BANG_DATA_DIR, else ./data); files go to DIR/NAME/")
    d.add_argument("--url", action="append", dest="urls", metavar="BASE_URL",
                   help="fetch from this base URL instead of the official locations (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = [n for n in args.datasets if n.lower().replace("-", "_") not in SOURCES]
    if unknown:
        p.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    root = Path(args.dir).expanduser() if args.dir else _default_dir()
    for name in args.datasets:  # a folder that already holds a dataset is only written if a file must be fetched
        folder = root / name.lower().replace("-", "_")
        problem = _unusable(root) if not folder.is_dir() else None
        if problem:
            print(f"error: --dir {root}: {problem}", file=sys.stderr)
            return 2
    try:
        for name in args.datasets:
            folder = download(name, root, urls=args.urls, progress=not args.no_progress)
            files = sorted(f.name for f in folder.iterdir() if f.is_file() and not f.name.endswith(".part"))
            print(f"{name}: {len(files)} files verified in {folder}/: {', '.join(files)}", file=sys.stderr)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk filled up, a folder vanished …
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume the download", file=sys.stderr)
        return 130
    root_abs = root.resolve()
    env = data_lib.resolve_data_dir(None)
    if env is None or env.resolve() != root_abs:
        print(f"use it with: export BANG_DATA_DIR={root_abs}   (or pass --data-dir {root_abs})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
