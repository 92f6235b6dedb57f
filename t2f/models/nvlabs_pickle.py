"""Read NVlabs stylegan2-ada-pytorch / stylegan3 network pickles without running their code.

Those `.pkl` files are plain pickles of `torch_utils.persistence` objects: each network object is
stored as a call `_reconstruct_persistent_obj(meta)` whose `meta` holds the class's *source code*
(`module_src`), its `class_name` and its `state` (the module's `__dict__`). `pickle.load` would
import NVlabs' packages and exec that source. `RestrictedUnpickler` instead resolves only a short
allow-list of globals (tensor/parameter/storage rebuilders, OrderedDict, set, EasyDict, numpy
array rebuilders) and turns each persistent record into a `PersistentRecord` holding the saved
state; `module_src` is dropped unread. Any other global (`os.system`, `builtins.eval`, ...) stops
the load with `UnsafePickleError` naming it, at the moment the pickle asks for it, so nothing it
refers to is ever called.
"""

import collections
import io
import pickle
import re

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class PersistentRecord:
    """One `torch_utils.persistence` object, kept as data: class name + saved `__dict__`."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("torch_utils.persistence record without the expected type/state fields")
        self.class_name = str(meta.get("class_name"))
        self.version = meta.get("version")
        self.state = dict(meta["state"])  # module_src is deliberately not kept (and never executed)

    def __repr__(self):
        return f"PersistentRecord({self.class_name})"


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access): kept as a plain dict."""


def _storage_from_bytes(data):
    # NVlabs-era tensors pickle their storage as torch.save bytes; read them the safe way.
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        name = refused_global(error)
        if name is None:
            raise pickle.UnpicklingError(f"a tensor's storage bytes are not a torch.save record: "
                                         f"{torch_load_reason(error)}") from None
        raise UnsafePickleError(f"global '{name}' hidden in a tensor's storage bytes is not allowed: only "
                                "tensors may appear there") from None


def refused_global(error) -> str | None:
    """The global a `torch.load(weights_only=True)` refusal names ('posix.system'), or None if it names none."""
    match = re.search(r"GLOBAL ([\w.]+)|unrecognized function (.+?)(?: which belongs|$)", str(error), re.MULTILINE)
    return (match.group(1) or match.group(2)) if match else None


def torch_load_reason(error) -> str:
    """torch.load's own reason in one line, without the advice around it (torch suggests
    weights_only=False, which would run whatever the file holds)."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                            "Please file an issue", "(1)", "(2)"))]
    return useful[0] if useful else ""


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return torch.nn.Parameter(data, requires_grad=False)  # frozen on arrival; hooks and extra state dropped


def _numpy_globals() -> dict:
    try:
        import numpy as np
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        try:
            from numpy.core import multiarray  # numpy 1.x
        except ImportError:
            return {}
    # Plain-data array and scalar rebuilders (stylegan3 networks keep numpy attributes).
    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickles name either
        found[(core, "_reconstruct")] = multiarray._reconstruct
        found[(core, "scalar")] = multiarray.scalar
    return found


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): __import__("codecs").encode,  # how protocol-2 pickles spell bytes
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and refuses everything else."""

    _allowed = None

    def find_class(self, module, name):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = {**ALLOWED_GLOBALS, **_numpy_globals()}
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"global '{module}.{name}' is not allowed: only tensors, parameters, plain containers and "
                "torch_utils.persistence records may appear in a network pickle") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} (this looks like a torch.save file, not an NVlabs .pkl)")


def read_pickle(fileobj):
    """Unpickle an NVlabs network pickle with `RestrictedUnpickler`."""
    return RestrictedUnpickler(fileobj).load()


def record_state_dict(record: PersistentRecord, prefix: str = "") -> dict:
    """Flatten a record tree of nn.Modules into a state dict (`mapping.fc0.weight`, ...)."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    tensors = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            tensors[prefix + name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise pickle.UnpicklingError(f"submodule '{prefix}{name}' is a {type(child).__name__}, "
                                         f"not a persistent NVlabs module")
        tensors.update(record_state_dict(child, f"{prefix}{name}."))
    return tensors


def record_init_kwargs(record: PersistentRecord, arg_names=()) -> dict:
    """The keyword arguments the network was constructed with (positional ones named by `arg_names`)."""
    args = tuple(record.state.get("_init_args") or ())
    kwargs = dict(record.state.get("_init_kwargs") or {})
    if len(args) > len(arg_names):
        raise pickle.UnpicklingError(f"{record.class_name} was built with {len(args)} positional arguments; "
                                     f"expected at most {len(arg_names)}")
    kwargs.update(zip(arg_names, args))
    return kwargs
