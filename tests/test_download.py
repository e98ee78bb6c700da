"""``python -m bang_jax.data download``: progress bar, SHA-256 check, resume with HTTP Range, clear errors.

Every test talks to a local HTTP server on 127.0.0.1 run in a thread; nothing goes to the internet.
"""

import gzip
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from bang_jax import data as data_lib, download as dl

ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (name -> bytes) under ``/files/`` and ``server.other[folder]`` elsewhere, with Range
    support; can cut a response or ignore Range."""

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        srv = self.server
        folder, name = self.path.rsplit("/", 1)
        srv.requests.append((name, self.headers.get("Range")))
        tree = srv.files if folder == "/files" else srv.other.get(folder, {})
        if name not in tree:
            self.send_error(404)
            return
        body = tree[name]
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = srv.cut_after.pop(name, None)  # cut only the first response for that file
        self.wfile.write(payload[:cut] if cut is not None else payload)
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.other, srv.requests, srv.cut_after, srv.ignore_range = {}, {}, [], {}, False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/files/"
    yield srv
    srv.shutdown()
    srv.server_close()


def _idx(array: np.ndarray) -> bytes:
    """An IDX uint8 file (the MNIST format) holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny_mnist():
    """Four small IDX .gz files in MNIST's names (12 train, 5 test images) and their SHA-256 table."""
    rng = np.random.default_rng(0)
    raw = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (12, 28, 28))),
        "train-labels-idx1-ubyte": _idx(rng.integers(0, 10, 12)),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (5, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx(rng.integers(0, 10, 5)),
    }
    files = {k + ".gz": gzip.compress(v, mtime=0) for k, v in raw.items()}
    checksums = {k: hashlib.sha256(v).hexdigest() for k, v in raw.items()}
    return files, checksums


def test_download_fetches_verifies_shows_progress_and_loads(server, tiny_mnist, tmp_path, capsys):
    files, checksums = tiny_mnist
    server.files.update(files)
    folder = dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums)
    assert folder == tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no .part left behind
    err = capsys.readouterr().err
    for name in files:
        assert f"mnist/{name}" in err  # one labelled progress bar per file
    assert "100%" in err
    ds = data_lib.load_mnist(tmp_path, source="files", verify=False)
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.test_labels.shape == (5,)

    server.requests.clear()  # a second call finds everything verified and fetches nothing
    dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False)
    assert server.requests == []
    assert "already there, checksum ok" in capsys.readouterr().err


def test_cut_download_resumes_with_range_request(server, tiny_mnist, tmp_path):
    files, checksums = tiny_mnist
    server.files.update(files)
    name = "train-images-idx3-ubyte.gz"
    half = len(files[name]) // 2
    server.cut_after[name] = half
    # The connection drops half way and retries=0 gives up: the partial file stays for the next call.
    with pytest.raises(dl.DownloadError, match="connection cut"):
        dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False, retries=0)
    part = tmp_path / "mnist" / (name + ".part")
    assert part.stat().st_size == half
    assert not (tmp_path / "mnist" / name).exists()
    server.requests.clear()
    dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False)
    assert (name, f"bytes={half}-") in server.requests  # continued, not restarted
    assert (tmp_path / "mnist" / name).read_bytes() == files[name] and not part.exists()


def test_cut_connection_is_resumed_within_one_call(server, tiny_mnist, tmp_path):
    files, checksums = tiny_mnist
    server.files.update(files)
    name = "t10k-images-idx3-ubyte.gz"
    server.cut_after[name] = 1000
    dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False, retries=2)
    assert (name, "bytes=1000-") in server.requests
    assert (tmp_path / "mnist" / name).read_bytes() == files[name]


def test_server_ignoring_range_restarts_cleanly(server, tiny_mnist, tmp_path):
    files, checksums = tiny_mnist
    server.files.update(files)
    server.ignore_range = True
    name = "train-labels-idx1-ubyte.gz"
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / (name + ".part")).write_bytes(files[name][:7])
    dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False)
    assert (tmp_path / "mnist" / name).read_bytes() == files[name]


def test_bad_checksum_is_a_clear_error_and_leaves_nothing(server, tiny_mnist, tmp_path):
    files, checksums = tiny_mnist
    bad = dict(files)
    bad["train-labels-idx1-ubyte.gz"] = gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    server.files.update(bad)
    with pytest.raises(dl.DownloadError) as info:
        dl.download("mnist", tmp_path, urls=[server.url], checksums=checksums, progress=False)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and "checksum mismatch" in message
    assert checksums["train-labels-idx1-ubyte"] in message  # the expected SHA-256 is named
    folder = tmp_path / "mnist"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists()
    assert not list(folder.glob("*.part"))  # a wrong file is never kept to resume from


def test_next_location_is_tried_after_a_missing_or_bad_file(server, tiny_mnist, tmp_path, capsys):
    files, checksums = tiny_mnist
    server.files.update(files)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    server.other["/bad"] = {name: gzip.compress(b"wrong") for name in files}
    dl.download("mnist", tmp_path, urls=[base + "/missing/", base + "/bad/", server.url], checksums=checksums,
                progress=False)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(files)
    err = capsys.readouterr().err
    assert "/missing/train-images-idx3-ubyte.gz failed (Not Found); trying the next location" in err
    assert "/bad/train-images-idx3-ubyte.gz sent a file that fails its checksum; removed it" in err


def test_cifar_archive_is_unpacked_verified_and_removed(server, tmp_path):
    rng = np.random.default_rng(1)
    record = 1 + 3 * 32 * 32
    bins = {f"data_batch_{i}.bin": rng.integers(0, 256, 2 * record, dtype=np.uint8) for i in range(1, 6)}
    bins["test_batch.bin"] = rng.integers(0, 256, 3 * record, dtype=np.uint8)
    for b in bins.values():
        b[::record] %= 10  # labels 0..9
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for base, arr in list(bins.items()) + [("batches.meta.txt", np.frombuffer(b"airplane\n", np.uint8))]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{base}")
            info.size = arr.nbytes
            tar.addfile(info, io.BytesIO(arr.tobytes()))
    server.files["cifar-10-binary.tar.gz"] = buf.getvalue()
    checksums = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in bins.items()}
    folder = dl.download("cifar10", tmp_path, urls=[server.url], checksums=checksums, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*bins, "batches.meta.txt"])
    ds = data_lib.load_dataset("cifar10", tmp_path, source="files", verify=False)
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)

    bad = dict(checksums)
    bad["test_batch.bin"] = "0" * 64
    for p in folder.iterdir():
        p.unlink()
    with pytest.raises(dl.DownloadError, match="checksum mismatch"):
        dl.download("cifar10", tmp_path, urls=[server.url], checksums=bad, progress=False)
    assert not (folder / "cifar-10-binary.tar.gz").exists() and not (folder / "test_batch.bin").exists()


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "bang_jax.data", "download", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_bad_checksum_exits_2_with_one_line_error(server, tmp_path):
    server.files.update({name: gzip.compress(b"not mnist") for name in dl.SOURCES["mnist"].files})
    proc = _cli(["mnist", "--dir", str(tmp_path), "--url", server.url, "--no-progress"])
    assert proc.returncode == 2, proc.stderr
    assert "error: could not get mnist file train-images-idx3-ubyte.gz" in proc.stderr
    assert "checksum mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def test_cli_unknown_dataset_is_a_usage_error():
    proc = _cli(["svhn"])
    assert proc.returncode == 2 and "unknown dataset(s) svhn" in proc.stderr


def test_cli_fetches_the_real_mnist_files_and_they_load(server, tmp_path, data_dir):
    """The official MNIST files (from the local data directory) through the command line, checked by its table."""
    for name in dl.SOURCES["mnist"].files:
        path = Path(data_dir) / "mnist" / name
        if not path.is_file():
            pytest.skip(f"{path} not available")
        server.files[name] = path.read_bytes()
    proc = _cli(["mnist", "--dir", str(tmp_path), "--url", server.url], env={"BANG_DATA_DIR": ""})
    assert proc.returncode == 0, proc.stderr
    assert "mnist: 4 files verified in" in proc.stderr and "export BANG_DATA_DIR=" in proc.stderr
    assert "Warning" not in proc.stderr
    ds = data_lib.load_mnist(tmp_path, source="files")
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.comparable_to_paper


def _serve_caffe(server, contents: dict[str, bytes]):
    for path in dl.SOURCES["bang_caffe"].files:
        folder, name = path.rsplit("/", 1)
        server.other.setdefault("/files/" + folder, {})[name] = contents[name]


def test_released_weights_download_checks_each_file(server, tmp_path):
    """``download bang_caffe`` fetches the four files from their sub-paths, saves them under their names and
    checks each raw file's SHA-256; a wrong file is refused and what the call created is removed."""
    fake = {Path(p).name: f"weights of {p}".encode() for p in dl.SOURCES["bang_caffe"].files}
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in fake.items()}
    _serve_caffe(server, fake)
    folder = dl.download("bang_caffe", tmp_path / "d", urls=[server.url], checksums=sums, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(fake)
    assert all((folder / n).read_bytes() == b for n, b in fake.items())
    # The real table refuses these bytes, and the folders this call made are gone again.
    with pytest.raises(dl.DownloadError, match="checksum mismatch"):
        dl.download("bang_caffe", tmp_path / "new" / "deeper", urls=[server.url], progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_fetches_the_real_released_weights(server, tmp_path, data_dir):
    from bang_jax.caffe import check_caffe_weights

    real = {}
    for name in ("lenet.caffemodel.h5", "lenet_bang.caffemodel.h5", "cifar10.caffemodel.h5",
                 "cifar10_bang.caffemodel.h5"):
        path = Path(data_dir) / "bang_caffe" / name
        if not path.is_file():
            pytest.skip(f"{path} not available")
        real[name] = path.read_bytes()
    _serve_caffe(server, real)
    proc = _cli(["bang_caffe", "--dir", str(tmp_path), "--url", server.url, "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "bang_caffe: 4 files verified in" in proc.stderr
    for name in real:
        check_caffe_weights(tmp_path / "bang_caffe" / name)


def test_cli_unusable_dir_is_one_line_before_any_download(server, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target in (afile, afile / "sub"):
        proc = _cli(["mnist", "--dir", str(target), "--url", server.url, "--no-progress"])
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: --dir {target}: {afile} is a file, not a folder"]
    assert server.requests == []
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        proc = _cli(["mnist", "--dir", str(ro), "--url", server.url, "--no-progress"])
        assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr
