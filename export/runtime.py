"""onnxruntime inference of an exported HyperMoE file: CUDA provider when a usable NVIDIA GPU and the CUDA
libraries onnxruntime-gpu was built against are present, else the CPU provider, with a one-line reason.

Inputs and outputs live on the provider's device and are bound once with IOBinding (preallocated,
stable addresses), so a timed run does no host copies; `fetch()` copies the outputs back when asked.
Optional CUDA-graph capture (fixed shapes; onnx-notes §3) — not verified on a GPU yet.

Availability is detected BEFORE asking onnxruntime for the CUDA provider: onnxruntime-gpu on a machine
without the CUDA libraries logs a screen of errors and silently falls back to the CPU otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

PROVIDERS = ("auto", "cuda", "cpu")
ORT_LOG_SEVERITY = 4  # fatal only (0 verbose … 3 error): failures reach the caller as ValueErrors with the message
ONNX_FLOAT, ONNX_INT64, ONNX_FLOAT16, ONNX_BFLOAT16 = 1, 7, 10, 16
ONNX_TYPES = {"tensor(float)": ONNX_FLOAT, "tensor(float16)": ONNX_FLOAT16, "tensor(bfloat16)": ONNX_BFLOAT16,
              "tensor(int64)": ONNX_INT64}


# ---------------------------------------------------------------------------------------------
# bfloat16 without ml_dtypes: numpy carries it as uint16 bit patterns
# ---------------------------------------------------------------------------------------------


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float → bfloat16 bit patterns (uint16), round to nearest even (as torch and onnxruntime do)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, onnx_type: int) -> np.ndarray:
    """x rounded to the model's input dtype, returned as float64 (what the reference should see)."""
    if onnx_type == ONNX_INT64:
        return x  # token ids
    if onnx_type == ONNX_BFLOAT16:
        return from_bfloat16_bits(to_bfloat16_bits(x)).astype(np.float64)
    return x.astype({ONNX_FLOAT: np.float32, ONNX_FLOAT16: np.float16}[onnx_type]).astype(np.float64)


def _host_buffer(x: np.ndarray, onnx_type: int) -> np.ndarray:
    if onnx_type == ONNX_BFLOAT16:
        return to_bfloat16_bits(x)
    return np.ascontiguousarray(x, dtype={ONNX_FLOAT: np.float32, ONNX_FLOAT16: np.float16, ONNX_INT64: np.int64}[onnx_type])


# ---------------------------------------------------------------------------------------------
# Is the CUDA provider usable here?
# ---------------------------------------------------------------------------------------------


def _gpu_count() -> tuple[int, str]:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    if libcuda.cuInit(0) != 0:
        return 0, "the NVIDIA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return 0, "no NVIDIA GPU visible (cuDeviceGetCount = 0)"
    return count.value, ""


def cuda_libraries() -> list[str]:
    """The shared libraries onnxruntime-gpu's CUDA provider needs (onnx-notes §3: libcudart, libcublas,
    libcublasLt of its CUDA major version, and libcurand.so.10)."""
    try:
        from onnxruntime.capi import build_and_package_info as info

        major = str(getattr(info, "cuda_version", "") or "").split(".")[0]
    except ImportError:
        major = ""
    if not major:
        return []
    return [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}", "libcurand.so.10"]


def cuda_status() -> tuple[bool, str]:
    """(usable, reason when not). Checks the onnxruntime build, a GPU, then the CUDA libraries (after
    onnxruntime.preload_dlls, silenced, which loads them from the nvidia-* pip packages when installed)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider (install onnxruntime-gpu)"
    count, why = _gpu_count()
    if not count:
        return False, why
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(Exception):
                ort.preload_dlls(cuda=True, cudnn=True)
    missing = []
    for name in cuda_libraries():
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            missing.append(name)
    if missing:
        return False, (f"CUDA libraries missing: {', '.join(missing)} (onnxruntime-gpu {ort.__version__} needs them; "
                       "pip install 'onnxruntime-gpu[cuda,cudnn]')")
    return True, ""


def choose_provider(requested: str = "auto") -> tuple[str, str]:
    """("cuda" | "cpu", notice). "auto" falls back to the CPU with a one-line notice saying why;
    a forced "cuda" that cannot work is a ValueError naming what is missing."""
    if requested not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {requested!r}")
    if requested == "cpu":
        return "cpu", ""
    usable, why = cuda_status()
    if usable:
        return "cuda", ""
    if requested == "cuda":
        raise ValueError(f"--provider cuda: the CUDA provider cannot run here: {why}")
    return "cpu", f"notice: running on the CPU provider: {why}"


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def open_session(path: str | os.PathLike, provider: str = "auto", *, cuda_graph: bool = False, device_id: int = 0,
                 threads: int | None = None, spinning: bool | None = None, profile_prefix: str | None = None):
    """(onnxruntime.InferenceSession, "cuda" | "cpu", notice) over one .onnx file: choose_provider's choice, the CUDA
    provider first with the CPU behind it for nodes without a CUDA kernel; CPU worker threads do not spin-wait
    unless spinning=True. `profile_prefix`: onnxruntime's profiler on, its JSON at that prefix (session.end_profiling()
    returns the file). A file onnxruntime cannot load is a one-line ValueError."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an .onnx file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    chosen, notice = choose_provider(provider)
    if cuda_graph and chosen != "cuda":
        raise ValueError("CUDA-graph capture needs the CUDA provider")
    ort.set_default_logger_severity(ORT_LOG_SEVERITY)
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    if threads:
        options.intra_op_num_threads = threads
    # onnxruntime's own default lets idle worker threads spin-wait between and after parallel ops. On the
    # CPU provider that steals cores from whatever runs next (torch in an interleaved benchmark, the next
    # session, other processes); measured on 2 cores, 2 threads, official sizes, T = 1024: torch eager
    # 84 → 50 ms and the sparse export 75 → 45 ms with spinning off (BENCHMARKS.md). Off on the CPU by
    # default; spinning=True restores onnxruntime's behaviour.
    if spinning is None:
        spinning = chosen != "cpu"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if chosen == "cuda":
        cuda_options = {"device_id": str(device_id)}
        if cuda_graph:
            cuda_options["enable_cuda_graph"] = "1"
        providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "NOT_IMPLEMENTED" in message and chosen == "cpu":
            message += (" (onnxruntime's CPU provider lacks this kernel; bfloat16 graphs and com.microsoft::MoE "
                        "in bfloat16 need the CUDA provider)")
        raise ValueError(f"{path}: onnxruntime cannot load this model: {message}") from None
    if chosen == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ValueError(f"onnxruntime did not enable the CUDA provider (got {session.get_providers()})")
    return session, chosen, notice


class Timing(NamedTuple):
    median_ms: float
    tokens_per_s: float
    runs: int


class OnnxRunner:
    """An onnxruntime session over one exported file, with device-resident, preallocated I/O.

    runner = OnnxRunner("layer.onnx")            # provider "auto"; CPU: worker threads do not spin-wait (spinning=True: they do)
    outputs = runner(x)                           # dict name → numpy (bfloat16 outputs as float32)
    runner.bind(x); runner.run_bound(); runner.fetch()   # the same, in steps; run_bound() does no copies
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto", *, cuda_graph: bool = False,
                 device_id: int = 0, threads: int | None = None, spinning: bool | None = None,
                 profile_prefix: str | None = None):
        path = Path(path)
        self.session, self.provider, self.notice = open_session(path, provider, cuda_graph=cuda_graph,
                                                                device_id=device_id, threads=threads, spinning=spinning,
                                                                profile_prefix=profile_prefix)
        self.device = ("cuda", device_id) if self.provider == "cuda" else ("cpu", 0)
        self.cuda_graph = cuda_graph
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one input (hidden_states), found {[i.name for i in inputs]}")
        self.input = inputs[0]
        self.input_type = ONNX_TYPES.get(self.input.type)
        if self.input_type is None:
            raise ValueError(f"{path}: unsupported input type {self.input.type}")
        self.outputs = self.session.get_outputs()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._binding, self._bound_shape, self._output_values = None, None, {}

    # --- shapes -------------------------------------------------------------------------------

    def check_input(self, x: np.ndarray) -> None:
        """ValueError unless x fits the model's input: rank, fixed dims, integer ids or floating point."""
        want = self.input.shape
        if not isinstance(x, np.ndarray) or x.ndim != len(want):
            raise ValueError(f"input must be a numpy array of rank {len(want)} {want}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        for axis, (have, dim) in enumerate(zip(x.shape, want)):
            if isinstance(dim, int) and have != dim:
                raise ValueError(f"input dim {axis} is {have}, the model expects {dim} (shape {want})")
        if self.input_type == ONNX_INT64:
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"input must be integer token ids (the model takes {self.input.type}), got {x.dtype}")
        elif not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"input must be floating point (the model takes {self.input.type}), got {x.dtype}")

    def _check_finite(self, x: np.ndarray, host: np.ndarray) -> None:
        """SPEC.md §3.9 for exported graphs: non-finite input is refused, naming the first bad token. The
        graphs would fail the whole batch (portable, sparse: an out-of-range GatherElements index) or give
        that token a NaN row silently (fused). `host` is x in the model's dtype, so a float16 overflow counts."""
        if self.input_type == ONNX_INT64:
            return
        values = x if self.input_type == ONNX_BFLOAT16 else host  # bfloat16 travels as uint16 bits
        finite = np.isfinite(values).all(axis=-1)  # (batch, seq): tokens whose d values are all finite
        if finite.all():
            return
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        where = f"batch {first[0]}, position {first[1]}" if len(first) == 2 else f"index {first}"
        cause = "" if not np.isfinite(x[first]).all() else f" after rounding to {self.input.type[7:-1]}"
        raise ValueError(f"input has NaN/Inf{cause} at token ({where}), {int((~finite).sum())} of {finite.size} "
                         "token(s) non-finite; exported graphs take finite input only (SPEC.md §3.9)")

    def _output_shape(self, output, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        symbols = {dim: size for dim, size in zip(self.input.shape, x_shape) if isinstance(dim, str)}
        shape = []
        for dim in output.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in symbols:
                shape.append(symbols[dim])
            else:
                raise ValueError(f"cannot infer output {output.name}'s dim {dim!r} from the input shape")
        return tuple(shape)

    # --- running ------------------------------------------------------------------------------

    def bind(self, x: np.ndarray) -> None:
        """Copy x to the device (once) and bind preallocated device outputs. Re-binding with the same
        shape reuses the buffers (stable addresses, as CUDA graphs need). NaN/Inf in x is a ValueError naming
        the first bad token, checked here on the host (np.isfinite, no device sync); run_bound() adds no check."""
        import onnxruntime as ort

        self.check_input(x)
        device, device_id = self.device
        with np.errstate(over="ignore"):  # a float16 overflow becomes ±Inf, which _check_finite reports
            host = _host_buffer(x, self.input_type)
        self._check_finite(x, host)  # on the host, before the copy: run_bound() reuses what was checked here
        if self._bound_shape != x.shape:
            if self.cuda_graph and self._bound_shape is not None:
                raise ValueError(f"CUDA graph captured for shape {self._bound_shape}; got {x.shape}: "
                                 "make one runner per shape")
            self._input_value = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), self.input_type, device, device_id)
            self._binding = self.session.io_binding()
            self._binding.bind_ortvalue_input(self.input.name, self._input_value)
            self._output_values = {}
            for out in self.outputs:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(self._output_shape(out, x.shape)), ONNX_TYPES[out.type], device, device_id)
                self._binding.bind_ortvalue_output(out.name, value)
                self._output_values[out.name] = value
            self._bound_shape = x.shape
        self._input_value.update_inplace(host)  # host → device, outside the timed runs

    def run_bound(self) -> None:
        """One inference on the bound buffers: no host copies (IOBinding)."""
        if self._binding is None:
            raise ValueError("call bind(x) first")
        self._binding.synchronize_inputs()
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as err:  # onnxruntime's own Fail/InvalidArgument classes
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"onnxruntime run failed on input shape {self._bound_shape}: {message}") from None
        self._binding.synchronize_outputs()

    def fetch(self) -> dict[str, np.ndarray]:
        """The bound outputs copied to the host (bfloat16 as float32)."""
        result = {}
        for name, value in self._output_values.items():
            if value.element_type() == ONNX_BFLOAT16:
                result[name] = from_bfloat16_bits(ortvalue_bits(value))
            else:
                result[name] = value.numpy()
        return result

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.bind(x)
        self.run_bound()
        return self.fetch()

    def benchmark(self, x: np.ndarray, *, warmup: int = 3, runs: int = 20) -> Timing:
        """Median latency of run_bound() on device-resident x, and tokens/s (tokens = all dims but the last)."""
        self.bind(x)
        for _ in range(warmup):  # CUDA graphs are captured during the warm-up runs
            self.run_bound()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.run_bound()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        tokens = int(np.prod(x.shape[:-1]))
        return Timing(median * 1e3, tokens / median if median > 0 else float("inf"), runs)


def ortvalue_bits(value) -> np.ndarray:
    """Raw bits of a bfloat16 OrtValue (numpy has no bfloat16 and this onnxruntime build has no DLPack
    export): a byte copy from its buffer, by memmove on the CPU or cudaMemcpy on the GPU."""
    bits = np.empty(value.shape(), dtype=np.uint16)
    if value.device_name().lower() == "cpu":
        ctypes.memmove(bits.ctypes.data, value.data_ptr(), bits.nbytes)
    else:
        cudart = ctypes.CDLL(cuda_libraries()[0])
        device_to_host = 2  # cudaMemcpyDeviceToHost
        if cudart.cudaMemcpy(ctypes.c_void_p(bits.ctypes.data), ctypes.c_void_p(value.data_ptr()),
                             ctypes.c_size_t(bits.nbytes), device_to_host) != 0:
            raise ValueError("cudaMemcpy of a bfloat16 output to the host failed")
    return bits
