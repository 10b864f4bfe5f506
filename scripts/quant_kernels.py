"""The onnxruntime CPU kernel timings docs/quantize.md quotes: one MatMulNBits node (int8 / int4, block 32, our bytes)
at accuracy_level 0 (float activations) and 4 (int8 activations) against a float MatMul, 1 thread, median of 7.

    python3 scripts/quant_kernels.py [--sizes 128x512 768x3072] [--tokens 1 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def session(w: np.ndarray, bits: int | None, level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import quantise

    K, N = w.shape
    if bits is None:
        node, inits = helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(w, "W")]
    else:
        q = quantise(w, bits, 32)
        node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                block_size=32, accuracy_level=level)
        inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales.reshape(-1), "scales")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["128x512", "768x3072"], help="KxN")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for size in args.sizes:
        K, N = map(int, size.split("x"))
        w = rng.standard_normal((K, N)).astype(np.float32)
        for T in args.tokens:
            x = rng.standard_normal((T, K)).astype(np.float32)
            cells = []
            for bits, level in ((None, 0), (8, 0), (8, 4), (4, 0), (4, 4)):
                s = session(w, bits, level)
                for _ in range(5):
                    s.run(None, {"x": x})
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    for _ in range(20):
                        s.run(None, {"x": x})
                    times.append((time.perf_counter() - start) / 20)
                name = "float32" if bits is None else f"int{bits} level {level}"
                cells.append(f"{name} {np.median(times) * 1e6:.0f} µs")
            print(f"K {K} N {N} T {T}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
