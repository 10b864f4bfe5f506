"""Greedy text from one model directory through every generator: hypermoe generate (torch, and onnxruntime on its
with-past export), transformers (AutoModelForCausalLM.generate and pipeline) and onnxruntime-genai (og.Model on the
export folder, its own og.Tokenizer). Prints each generator's text and ids, and whether all ids are the same.

    python3 scripts/hf_generators.py MODEL_DIR --prompt "ROMEO:" [--max-new-tokens 40] [--export DIR]

MODEL_DIR is a model directory of kind "model" holding its tokenizer.json (as `hypermoe train` writes it from a
corpus of scripts/fetch_corpus.py --tokenizer bpe). --export: where the with-past export goes (default: a temporary
folder, removed at the end); an existing export folder there is used as it is. Differences are reported, not judged:
float32 generators agree where the top-2 logit gap exceeds their rounding (tests/test_hf.py gates on that).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generators(model_dir: str | Path, prompt: str, max_new_tokens: int, export_dir: str | Path) -> dict[str, tuple]:
    """{generator: (new ids, text of prompt + new ids)} for the greedy continuation of `prompt`."""
    import torch
    from transformers import AutoModelForCausalLM, pipeline

    import hypermoe.hf  # noqa: F401  registers model_type "hypermoe"
    from export.exporter import export_model, load_source, model_folder_extras
    from export.generate import FileTokenizer, load_decoder
    from hypermoe.generation import generate

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    tokenizer = FileTokenizer(model_dir / "tokenizer.json")
    ids = tokenizer.encode(prompt)
    if not (export_dir / "genai_config.json").is_file():
        cfg, params, kind, source = load_source(model_dir)
        folder_tokenizer, eos = model_folder_extras(model_dir, None, with_past=True)
        export_model(export_dir, cfg, params, kind=kind, with_past=True, source=source, eos_token_id=eos,
                     tokenizer=folder_tokenizer)
    out = {}
    for name, path, provider in (("hypermoe generate (torch)", model_dir, "auto"),
                                 ("hypermoe generate (onnxruntime)", export_dir, "cpu")):
        decoder, cfg, _, _ = load_decoder(path, provider)
        new = generate(decoder, [ids], max_new_tokens=max_new_tokens, max_length=cfg.max_seq_len).tokens[0]
        out[name] = (new, tokenizer.decode(ids + new))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tensor = torch.tensor([ids])
    new = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens,
                         do_sample=False)[0, len(ids):].tolist()
    out["transformers generate"] = (new, tokenizer.decode(ids + new))
    pipe = pipeline("text-generation", model=str(model_dir))  # the folder's tokenizer.json, through transformers
    full = list(pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_tensors=True)[0]["generated_token_ids"])
    text = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False)[0]["generated_text"]
    out["transformers pipeline"] = (full[len(ids):], text)
    try:
        import onnxruntime_genai as og
    except ImportError:
        return out
    og_model = og.Model(str(export_dir))
    og_tokenizer = og.Tokenizer(og_model)
    og_ids = [int(t) for t in og_tokenizer.encode(prompt)]
    search = og.GeneratorParams(og_model)
    search.set_search_options(max_length=len(og_ids) + max_new_tokens, do_sample=False, batch_size=1)
    generator = og.Generator(og_model, search)
    generator.append_tokens(np.array([og_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    new = [int(t) for t in generator.get_sequence(0)][len(og_ids):]
    out["onnxruntime-genai"] = (new, og_tokenizer.decode(np.array(og_ids + new, dtype=np.int32)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy text from one model directory through hypermoe generate, "
                                     "transformers and onnxruntime-genai (module docstring).")
    parser.add_argument("model_dir", help="a model directory (kind model) holding tokenizer.json")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--export", default=None, help="the with-past export folder (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = generators(args.model_dir, args.prompt, args.max_new_tokens, args.export or Path(tmp) / "export")
    except (ValueError, FileNotFoundError) as err:
        print(f"hf_generators: error: {err}", file=sys.stderr)
        return 2
    for name, (ids, text) in results.items():
        print(f"--- {name}\n{text}\nids: {' '.join(map(str, ids))}")
    same = len({tuple(ids) for ids, _ in results.values()}) == 1
    print(f"same ids from all {len(results)} generators: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
