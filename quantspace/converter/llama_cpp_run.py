"""Runs llama.cpp's convert_hf_to_gguf.py as it is, with one difference: a byte-level BPE tokenizer whose
vocabulary llama.cpp's table of known models lacks is given the pre-tokenizer QuantSpace recognised by behaviour
(QUANTSPACE_BPE_PRE), instead of being refused. Run as a script (never imported from quantspace), so that only
llama.cpp's own gguf-py is loaded:

    python llama_cpp_run.py CONVERTER_DIR <convert_hf_to_gguf.py arguments>
"""

import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    folder = Path(sys.argv[1])
    script = folder / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0:0] = [str(folder), str(folder / "gguf-py")]
    pre = os.environ.get("QUANTSPACE_BPE_PRE")
    if pre:
        from conversion.base import TextModel

        known = TextModel.get_vocab_base_pre

        def recognised(self, tokenizer):
            try:
                return known(self, tokenizer)   # llama.cpp's own identification wins where it has one
            except NotImplementedError:
                return pre

        TextModel.get_vocab_base_pre = recognised
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
