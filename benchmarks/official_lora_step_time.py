"""The authors' DVPO trainer with its LoRA policy, timed by the peer driver (docs/benchmarks.md).

``../shared/peers/dvpo-official/official_dvpo_step_time.py`` times the official trainer's full fine-tune
path. The repository's launch script (``dvpo/policy_model_training/base_policy.py``) also has a LoRA path,
``use_peft`` (its default), which this runs:

* LoRA as the script configures it: ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
  task_type="CAUSAL_LM")`` with PEFT's default target modules for the architecture (``q_proj`` and ``v_proj``
  for Llama), after ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)`` - which,
  for a model not loaded quantized, only freezes the base weights (PEFT 0.13 turns gradient checkpointing
  on for quantized models only), so the update runs without recomputation, as the full path does;
* no separate reference model: the trainer takes the policy with its adapter disabled
  (``optional_peft_ctx``), so reference forwards are timed as policy forwards.

The script wraps that LoRA model in trl's ``AutoModelForCausalLMWithValueHead``, which fails with trl 0.11.4
for the reason the driver's README gives for the full path (the trainer indexes the policy's output with
``['logits']``; the wrapper returns a tuple). The trainer's own ``optional_peft_ctx`` calls
``disable_adapter`` on the unwrapped policy itself (the ``.pretrained_model`` variant is commented out), i.e.
it expects a PEFT model as the policy: this applies the script's LoRA set-up to the plain causal LM the
driver builds, and changes nothing else. Run it from the driver's folder (set up as its README says), with the
driver's venv and arguments; ``$REPO`` is this checkout:

    venv/bin/python $REPO/benchmarks/official_lora_step_time.py --driver official_dvpo_step_time.py \
        --dvpo-dir DKI_LLM/dvpo/policy_model_training --model smollm2-135m-instruct-hf \
        --prompts $REPO/data/smollm2_ifeval/prompts.jsonl --split train --steps 5
"""

from __future__ import annotations

import argparse
import importlib.util
import sys


def load_driver(path: str):
    spec = importlib.util.spec_from_file_location("official_dvpo_step_time", path)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver


def lora_policy_on_first_load() -> None:
    """Make the driver's first ``AutoModelForCausalLM.from_pretrained`` (the policy) return the script's LoRA
    model; later loads (trl builds the value model's trunk through the same class) are left alone."""
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    auto = transformers.AutoModelForCausalLM
    plain_from_pretrained = auto.from_pretrained

    def from_pretrained(*args, **kwargs):
        auto.from_pretrained = plain_from_pretrained
        model = plain_from_pretrained(*args, **kwargs)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                                 task_type="CAUSAL_LM"))
        model.is_peft_model = True  # what base_policy.py sets; the trainer reads it
        model.print_trainable_parameters()
        return model

    auto.from_pretrained = from_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--driver", required=True, help="path of official_dvpo_step_time.py")
    args, driver_args = parser.parse_known_args()
    driver = load_driver(args.driver)

    timer_wrap = driver.PhaseTimer.wrap

    def wrap(timer, owner, attribute, name, phase_of=None):
        if owner is None:  # the trainer's ref_model: None for a PEFT policy (the policy with its adapter off)
            return
        timer_wrap(timer, owner, attribute, name, phase_of)

    driver.PhaseTimer.wrap = wrap
    lora_policy_on_first_load()
    sys.argv = [args.driver, *driver_args]
    driver.main()


if __name__ == "__main__":
    main()
