"""`modalign data import|export`: public preference data in, the feedback the trainer learns from out.

  modalign data import FORMAT FILE   a published dataset's file (FORMAT: rlaif-v, rlhf-v, vlfeedback,
                                     llava-human-preference; FILE: .jsonl, .json or .parquet) as the events live
                                     traffic produces: generations, then feedback (importing.py)
  modalign data export OUT.parquet   every preference pair the trainer's join makes of the topics, as a
                                     dataset in TRL's conversational vision preference format (exporting.py)

formats.py reads each dataset's published fields. docs/data.md has the field mappings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modalign.core.config import add_arguments, build_config
from modalign.core.kafka import BrokerUnavailable
from modalign.data.formats import FORMATS, InvalidFile, InvalidRecord


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalign data", description=(__doc__ or "").split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    # Their modules load the policy's code (transformers, torch): imported when the command runs, so that
    # modalign.data.formats alone stays light.
    from modalign.data import exporting, importing
    from modalign.policy.families import UnsupportedModel

    importer = actions.add_parser("import", help="a public preference dataset's file, as generations and feedback",
                                  description=(importing.__doc__ or "").split("\n\n")[0])
    importer.add_argument("format", choices=sorted(FORMATS), help="the dataset the file is from")
    importer.add_argument("file", type=Path, help="its records: .jsonl, .json (an array) or .parquet")
    add_arguments(importer, importing.ImportConfig)
    exporter = actions.add_parser("export", help="the joined feedback as a TRL preference dataset (Parquet)",
                                  description=(exporting.__doc__ or "").split("\n\n")[0])
    exporter.add_argument("out", type=Path, help="the Parquet file to write")
    add_arguments(exporter, exporting.ExportConfig)
    args = parser.parse_args(argv)

    if args.action == "export":
        export_config = build_config(exporter, exporting.ExportConfig, args)
        print("\n".join(exporting.summary(args.out, exporting.export(export_config, args.out))))
        return 0
    config = build_config(importer, importing.ImportConfig, args)
    if not args.file.is_file():
        importer.error(f"{args.file}: no such file")
    try:
        plan, written = importing.import_file(config, args.format, args.file)
    except (InvalidRecord, InvalidFile) as error:
        # Nothing was written: a file that cannot be imported is refused as a malformed flag is (status 2).
        importer.error(f"{args.file}: {error}")
    except UnsupportedModel as error:
        importer.error(f"argument --policy-model-dir: {error}")
    except BrokerUnavailable as error:
        print(f"modalign data import: {error}; some of the file may be written: import it again (it is idempotent)")
        return 1
    print("\n".join(importing.summary(args.format, args.file, plan, written)))
    return 0
