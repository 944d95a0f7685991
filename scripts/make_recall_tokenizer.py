"""Write the word-level tokenizer of the recall task into a model directory (the shipped one by default).

    python scripts/make_recall_tokenizer.py [--model-dir models/armt-recall]

tokenizer.json: word i of graphs.recall.recall_words(task) has token id i (the ids the model was
trained on; `<pad>` is special and skipped when decoding). tokenizer_config.json: pad token `<pad>`,
no EOS (answers are one word: generate one token). The task is read from the directory's
recall_task.json. The model id does not change (it covers config and weights only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.atomic import write_files_together  # noqa: E402
from graphs.recall import PAD_WORD, RecallTask, recall_words  # noqa: E402
from graphs.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, word_level_tokenizer_json  # noqa: E402


def recall_tokenizer_files(task: RecallTask) -> dict[str, str]:
    """File name -> text of the recall task's tokenizer."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD_WORD, "eos_token": None,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    return {TOKENIZER_JSON: word_level_tokenizer_json(recall_words(task), specials=(PAD_WORD,)) + "\n",
            TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "armt-recall"))
    args = parser.parse_args()
    d = Path(args.model_dir)
    task = RecallTask.from_dict(json.loads((d / "recall_task.json").read_text()))
    write_files_together({d / name: text.encode() for name, text in recall_tokenizer_files(task).items()})
    print(f"wrote {TOKENIZER_JSON} and {TOKENIZER_CONFIG} ({task.vocab_size} words) to {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
