import json


def write_jsonl(path, records):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)
