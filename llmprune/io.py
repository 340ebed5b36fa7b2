"""Files: atomic writes (JSON, text, bytes) and saving a pruned checkpoint.

Everything is written to a temporary name in the destination's folder and renamed into place,
so an interrupted run leaves either the old file (or nothing) or the complete new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

from llmprune.errors import LlmpruneError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file in the same folder,
    which is then renamed over ``path``. Every file llmprune writes itself (results, tables,
    plots, checkpoint metadata) goes through here, so the rules on what may be replaced live in one place.
    """
    try:
        with atomic_target(path) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as exc:  # ENOSPC, EFBIG on write() name no file: say which one could not be written
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return Path(path)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, signals: bool = False):
    """A temporary file name beside ``path`` for a writer that wants a name, not a file object
    (the gguf package); renamed over ``path`` when the body ends, removed when it raises (and,
    with ``signals``, on SIGTERM/SIGHUP: large exports). The same rules as :func:`write_atomic`."""
    path = Path(path)
    _refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with signals_raise() if signals else contextlib.nullcontext():
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() follows the umask
            _refuse_non_regular(path)  # again: something may have appeared there while we wrote
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _refuse_non_regular(path: Path) -> None:
    """We replace only regular files: never rename over a symlink, a device, a pipe or a folder."""
    if path.is_symlink():
        raise LlmpruneError(f"{path} is a symbolic link: llmprune writes only regular files it can replace "
                            "atomically; give the real path or a new file name")
    if path.exists() and not path.is_file():
        raise LlmpruneError(f"{path} exists and is not a regular file: give a new file name")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8, newlines as given, atomically."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    # serialised before the file is made: an unserialisable object leaves nothing behind
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch  # only when an object needs it: io stays importable without torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, torch.dtype):
            return str(obj)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------
# Output paths: checked before any slow work, and never replacing what is not ours


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def _check_parent(path: Path, what: str) -> None:
    """The folder that will hold ``path`` exists and is writable, or can be made."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        raise LlmpruneError(f"{what} {path}: {anchor} is not a folder, so {path.parent} cannot be made; "
                            "give a path inside an existing folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise LlmpruneError(f"{what} {path}: the folder {anchor} is not writable; give a path "
                            "you can write to")


def check_output_file(path: str | os.PathLike, what: str = "--json") -> Path:
    """Validate a results file path before any work: refuse folders, symlinks, devices and any
    other non-regular file (we never rename over what is not a plain file of ours), and a parent
    that cannot be made or written. Returns the path."""
    path = Path(path).expanduser()
    if str(path).endswith(os.sep) or path.is_dir():
        raise LlmpruneError(f"{what} {path} is a folder: give a file name such as {path / 'result.json'}")
    if path.is_symlink():
        raise LlmpruneError(f"{what} {path} is a symbolic link: llmprune writes only regular files it can "
                            "replace atomically; give the real path or a new file name")
    if path.exists() and not path.is_file():
        raise LlmpruneError(f"{what} {path} is not a regular file (a device, pipe or socket): "
                            "give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise LlmpruneError(f"{what} {path} is not writable: give another file name")
    _check_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "--out", holds: str = "", *,
                     refuse_links: bool = False) -> Path:
    """Validate an output folder before any work: an existing writable folder, or one that can be
    made (its nearest existing parent is a writable folder). ``holds`` says what is written
    there, for the messages; ``refuse_links``: a symbolic link is refused too (for folders we
    write through and delete in, as ``--offload-dir``)."""
    path = Path(path).expanduser()
    why = f"{holds}; " if holds else ""
    if refuse_links and path.is_symlink():
        raise LlmpruneError(f"{what} {path} is a symbolic link: give the real folder")
    if path.exists() and not path.is_dir():
        fix = "give a folder (it is made if missing)" if holds else "give a folder for the results"
        raise LlmpruneError(f"{what} {path} is a file: {why}{fix}")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise LlmpruneError(f"{what} {path} is not writable: {why}give a folder you can write to")
    else:
        _check_parent(path, what)
    return path


def check_apart(paths: list[tuple[str, str | os.PathLike | None, str]]) -> None:
    """Refuse, before any work, outputs that would collide with each other or with an input.

    ``paths``: ``(what, path, role)`` with role ``file`` (an output file, e.g. --json),
    ``folder`` (an output folder replaced as a whole, e.g. --save), ``workdir`` (a folder we only
    add a private folder to, e.g. --offload-dir) or ``input`` (read, never written). Two paths
    collide when they are the same (inputs among themselves excepted), or when one lies inside a
    ``folder`` output: the save would find it there, or replace it. None paths are skipped.
    """
    entries = [(what, Path(path).expanduser(), role) for what, path, role in paths if path not in (None, "")]
    resolved = [(what, path, path.resolve(), role) for what, path, role in entries]
    for i, (what_a, shown_a, a, role_a) in enumerate(resolved):
        for what_b, shown_b, b, role_b in resolved[i + 1:]:
            if role_a == role_b == "input":
                continue
            if a == b:
                raise LlmpruneError(f"{what_a} {shown_a} and {what_b} {shown_b} are the same path: "
                                    "give each its own")
            for (what_in, shown_in, inner), (what_out, shown_out, outer, role_out) in (
                    ((what_a, shown_a, a), (what_b, shown_b, b, role_b)),
                    ((what_b, shown_b, b), (what_a, shown_a, a, role_a))):
                if role_out == "folder" and outer in inner.parents:
                    raise LlmpruneError(f"{what_in} {shown_in} is inside {what_out} {shown_out}, which the "
                                        f"checkpoint replaces as a whole: give {what_in} a path outside it")


def check_input_file(name: str | os.PathLike, what: str) -> None:
    """An input given as a path that exists must be a regular file or a folder: a pipe, socket or
    device would block or be read once (a FIFO is not "missing", as the data lookup would say)."""
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name too long for the file system: not a path
        return
    if exists and not path.is_file() and not path.is_dir():
        raise LlmpruneError(f"{what} {path} is not a regular file (a pipe, socket or device): give a text, "
                            "jsonl or json file, or a dataset name")


# Files a checkpoint of ours holds (save_pretrained's and the tokenizer's, plus llmprune.json);
# used for checkpoints written before llmprune.json listed its files.
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "llmprune.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                     "tokenizer.model", "chat_template.jinja", "added_tokens.json")
_CHECKPOINT_GLOBS = ("*.safetensors", "*.safetensors.index.json")
SAVE_METADATA = "llmprune.json"
_TMP_TAG = ".llmprune-tmp-"


def _ours(folder: Path) -> set[str] | None:
    """The names llmprune wrote into ``folder`` (from its llmprune.json), or None if it is not ours."""
    try:
        meta = json.loads((folder / SAVE_METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    files = meta.get("files")
    if isinstance(files, list):
        return {str(f) for f in files} | {SAVE_METADATA}
    return {p.name for p in folder.iterdir()
            if p.name in _CHECKPOINT_FILES or any(fnmatch.fnmatchcase(p.name, g) for g in _CHECKPOINT_GLOBS)}


def check_save_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "--save") -> Path:
    """Validate a checkpoint folder before any work is done.

    A new or empty folder is fine. A non-empty one needs ``overwrite``, and then it must be an
    llmprune checkpoint holding only files llmprune wrote: a folder with anything else is refused,
    never deleted. The current folder (or one above it) is refused: it cannot be swapped atomically.
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        raise LlmpruneError(f"{what} {path} is a symbolic link: give the real folder or a new name")
    if path.exists() and not path.is_dir():
        raise LlmpruneError(f"{what} {path} is a file: give a folder name for the checkpoint")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LlmpruneError(f"{what} {path} is the current folder or one above it: give a new folder "
                            "such as ./pruned")
    _check_parent(resolved, what)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LlmpruneError(f"{path} already exists and is not empty: choose a new directory or "
                                "pass --overwrite")
        ours = _ours(path)
        if ours is None:
            raise LlmpruneError(f"--overwrite refuses {path}: it is not an llmprune checkpoint (no "
                                f"{SAVE_METADATA}); choose a new directory")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
        if foreign:
            raise LlmpruneError(f"--overwrite refuses {path}: it holds {foreign[0]!r}, which llmprune did "
                                "not write; move it away or choose a new directory")
        if not os.access(path, os.W_OK):
            raise LlmpruneError(f"{what} {path} is not writable: choose another directory")
    return path


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Delete temporaries of ours for ``name`` left by a killed save (their process is gone)."""
    for stale in parent.glob(f".{name}{_TMP_TAG}*"):
        pid = stale.name.rsplit(_TMP_TAG, 1)[-1].split(".", 1)[0]
        if pid.isdigit() and process_alive(int(pid)):
            continue  # another save of the same name is running now
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the signal arrived so that cleanup code runs (as for
    Ctrl-C); ``signum`` gives the exit code, 128 + signum, that the default action would have."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for a process stopped by this interrupt: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


@contextlib.contextmanager
def signals_raise():
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` for the duration, so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:  # a forked worker (lm-eval's bootstrap pool) being ended: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    previous = {}
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _gguf_quantization(model):
    quant = getattr(model.config, "quantization_config", None)
    is_gguf = (isinstance(quant, dict) and quant.get("quant_method") == "gguf") or \
        getattr(quant, "quant_method", None) == "gguf"
    return is_gguf, quant


def model_source(model: Any) -> str | None:
    """The name a model was loaded from: what :func:`llmprune.load_model` remembered
    (``model.llmprune_source``: the alias, the hub id, or the absolute path of a local file or
    folder), else the ``_name_or_path`` transformers keeps in the config; None when neither says."""
    remembered = getattr(model, "llmprune_source", None)
    if isinstance(remembered, str) and remembered:
        return remembered
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _recorded_source(model: Any, path: Path) -> str | None:
    """The source to record for ``model`` saved at ``path``: :func:`model_source`, except that a
    model loaded from ``path`` itself keeps the source that folder records (re-saving a checkpoint
    in place must not make it its own source and lose the GGUF it came from)."""
    source = model_source(model)
    if source is None:
        return None
    try:
        same = Path(source).expanduser().resolve() == path
    except (OSError, ValueError):
        same = False
    if not same:
        return source
    try:
        recorded = json.loads((path / SAVE_METADATA).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def save_pruned(model: Any, tokenizer: Any, path: str | os.PathLike, metadata: dict | None = None,
                overwrite: bool = False, write_weights: Callable[[Any, Path], Any] | None = None,
                what: str = "--save") -> Path:
    """Save ``model`` as a Hugging Face checkpoint (safetensors, config, tokenizer) plus
    ``llmprune.json``, and return the folder.

    ``metadata`` goes into ``llmprune.json`` (:func:`llmprune.prune_model` and ``llmprune prune
    --save`` write their whole result record there). Without a ``"model"`` key, the source the
    model was loaded from is recorded (:func:`model_source`): a later ``llmprune export`` of a
    model that came from a GGUF file (the bundled ``smollm2-135m`` too) then copies that file's
    tokenizer instead of rebuilding it. ``overwrite`` lets ``path`` replace an earlier llmprune
    checkpoint (never a folder holding anything else). The checkpoint loads with
    :func:`llmprune.load_model` or plain transformers (``AutoModelForCausalLM.from_pretrained``).

    Written into a temporary sibling folder, then put under ``path`` in one step: a new folder by
    rename, an existing checkpoint of ours by an atomic exchange (Linux), so ``path`` always holds
    either the old or the new checkpoint. Where ``path`` cannot be renamed (a mount point, another
    file system) the files are copied into it one by one instead (:func:`_copy_into`); if even
    that fails, the complete checkpoint is kept beside it under a visible name that the error
    gives. Until the checkpoint is complete, the temporary is removed on any exception and on
    SIGTERM or SIGHUP; one left by a killed process is removed by the next save of the same name.
    ``llmprune.json`` lists the files written, which is what a later ``overwrite`` may replace.
    ``write_weights(model, folder)`` writes the config and weights in another format than
    ``save_pretrained`` (llmprune.export.compressed). A full disk or a file-size limit is an
    ``OSError`` whatever library hit it (safetensors, tokenizers, torch). ``what`` names ``path``
    in messages (``--save``, ``DST``). Folders and files follow the umask, as ``save_pretrained``'s.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> report = llmprune.prune(model, tok, llmprune.PruneConfig(method="magnitude"))
        >>> llmprune.save_pruned(model, tok, "smollm2-magnitude")
        PosixPath('/.../smollm2-magnitude')
    """
    path = check_save_dir(path, overwrite, what).resolve()
    record = dict(metadata or {})
    if "model" not in record:
        source = _recorded_source(model, path)
        if source is not None:
            record["model"] = source
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{os.getpid()}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    complete = False
    with signals_raise(), _plain_config(model):
        try:
            _fill(tmp, model, tokenizer, record, write_weights)
            complete = True
            _place(tmp, path)
        except Exception as exc:
            if not complete:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            raise _kept(exc, tmp, path) from None  # the work is done and on disk: never delete it
        except BaseException:  # Ctrl-C, SIGTERM: the user stops the save
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


@contextlib.contextmanager
def _plain_config(model: Any):
    """A GGUF-loaded model says {quant_method: gguf}; the weights we save are plain dequantized
    tensors, so the saved config must not claim otherwise. Restored when the save ends."""
    is_gguf, quant = _gguf_quantization(model)
    if not is_gguf:
        yield
        return
    hf_quantizer = getattr(model, "hf_quantizer", None)
    try:
        del model.config.quantization_config
        if hf_quantizer is not None:
            model.hf_quantizer = None
        yield
    finally:
        model.config.quantization_config = quant
        if hf_quantizer is not None:
            model.hf_quantizer = hf_quantizer


def _fill(tmp: Path, model: Any, tokenizer: Any, record: dict,
          write_weights: Callable[[Any, Path], Any] | None) -> None:
    """Write the checkpoint into the temporary folder ``tmp``: weights, tokenizer, llmprune.json."""
    with io_errors():
        if write_weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            write_weights(model, tmp)
        from llmprune.nonuniform import write_loader  # torch and transformers: io itself stays light

        write_loader(model, tmp)  # blocks of different widths: the modeling file plain transformers needs
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    files = sorted(p.name for p in tmp.iterdir()) + [SAVE_METADATA]
    write_json_atomic(tmp / SAVE_METADATA, {**record, "files": sorted(set(files))})


# rename(2) errors that mean "this folder cannot be swapped" rather than "this cannot be written":
# a mount point (EBUSY), another file system (EXDEV), a folder we may write in but not replace
_CANNOT_RENAME = {errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP,
                  getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _place(tmp: Path, path: Path) -> None:
    """Put the complete checkpoint ``tmp`` at ``path``: rename, exchange, or copy into place."""
    try:
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old checkpoint, checked to be ours
        else:
            old = path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}.old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old)
        return
    except OSError as exc:
        if exc.errno not in _CANNOT_RENAME or not path.is_dir() or path.is_symlink():
            raise
    _copy_into(tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)


def _copy_into(tmp: Path, path: Path) -> None:
    """Copy the checkpoint in ``tmp`` into the existing folder ``path``, file by file, each one
    atomically. While it runs, ``path``'s llmprune.json lists every file that may be there (the old
    checkpoint's and the new one's, marked ``incomplete``), so an interrupted copy can still be
    replaced with ``--overwrite``; the new llmprune.json is written last."""
    old = _ours(path) or set()
    meta = json.loads((tmp / SAVE_METADATA).read_text(encoding="utf-8"))
    new = sorted(p.name for p in tmp.iterdir())
    present = {p.name for p in path.iterdir()} & old
    write_json_atomic(path / SAVE_METADATA, {**meta, "files": sorted(present | set(new)), "incomplete": True})
    for name in new:
        if name == SAVE_METADATA:
            continue
        source = tmp / name
        if source.is_dir():
            shutil.copytree(source, path / name, dirs_exist_ok=True)
        else:
            with atomic_target(path / name) as target:
                shutil.copyfile(source, target)
    for name in sorted(present - set(new) - {SAVE_METADATA}):  # the old checkpoint's files the new one lacks
        stale = path / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    with atomic_target(path / SAVE_METADATA) as target:
        shutil.copyfile(tmp / SAVE_METADATA, target)


def _kept(exc: Exception, tmp: Path, path: Path) -> OSError:
    """The error to raise when the complete checkpoint ``tmp`` could not be put at ``path``: it
    is renamed to a visible name beside ``path`` (a hidden temporary would be removed by the next
    save; where even that rename fails, it stays where it is) and the message says where."""
    kept = tmp
    for n in range(1000):
        candidate = path.with_name(f"{path.name}.llmprune-saved" + (f"-{n}" if n else ""))
        if candidate.exists() or candidate.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.rename(tmp, candidate)
            kept = candidate
        break
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OSError(getattr(exc, "errno", None) or errno.EIO,
                   f"{reason} while moving it into {path}; the complete "
                   f"checkpoint is in {kept}: move it to {path} yourself")


# Rust's io::Error, as safetensors and tokenizers print it
_IO_CODE = re.compile(r"os error (\d+)|code: (\d+)")
_IO_TEXT = re.compile(r"No space left|File too large|Read-only file system|Disk quota|file write failed|"
                      r"Input/output error", re.IGNORECASE)


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError when it reports a failed write (safetensors' SafetensorError, the
    tokenizers' Rust errors, torch.save's RuntimeError do not derive from OSError); None when it
    is something else (a bug keeps its traceback)."""
    if isinstance(exc, OSError):
        return exc
    text = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())[:200]
    code = _IO_CODE.search(text)
    if code is not None:
        number = int(code.group(1) or code.group(2))
        return OSError(number, f"{os.strerror(number)} ({type(exc).__name__}: {text})")
    if _IO_TEXT.search(text):
        return OSError(errno.EIO, f"{type(exc).__name__}: {text}")
    return None


@contextlib.contextmanager
def io_errors():
    """Turn a library's failed write into an OSError (see :func:`as_os_error`)."""
    try:
        yield
    except Exception as exc:
        converted = as_os_error(exc)
        if converted is None or converted is exc:
            raise
        raise converted from None
