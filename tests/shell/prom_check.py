#!/usr/bin/env python3
"""prom_check.py - checks text against the Prometheus text exposition format
(version 0.0.4), as node_exporter's textfile collector reads it.

Usage: prom_check.py FILE [--prefix P] [--label NAME=VALUE]... [--counters-total]
       prom_check.py --self-test

Rules checked:
  - every line is empty, a comment, "# HELP name text", "# TYPE name type",
    or a sample: name[{label="value",...}] value [timestamp];
  - metric names match [a-zA-Z_:][a-zA-Z0-9_:]*, label names
    [a-zA-Z_][a-zA-Z0-9_]* and do not start with "__";
  - in label values only \\\\, \\" and \\n are escapes; in HELP text only \\\\ and
    \\n; values are floats (NaN, +Inf, -Inf allowed), timestamps integers;
  - at most one HELP and one TYPE per name, TYPE before the first sample of
    its family, a known type; a family's samples are not interleaved with
    another's; no series appears twice;
  - with --prefix, every name starts with it, and every family has HELP and
    TYPE; with --label, every sample carries that label with that value
    (after unescaping); with --counters-total, counter names end in _total.
Exits 0 when the text follows the rules, else 1 naming the line.
"""
import re
import sys

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class Bad(Exception):
    pass


def unescape(s, allowed):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or s[i + 1] not in allowed:
                raise Bad("bad escape %r" % s[i:i + 2])
            out.append({"\\": "\\", '"': '"', "n": "\n"}[s[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_labels(s, pos):
    """s[pos] == '{'; returns (labels dict, position after '}')."""
    labels, i = {}, pos + 1
    while True:
        if i < len(s) and s[i] == "}":
            return labels, i + 1
        m = LABEL.match(s, i)
        if not m:
            raise Bad("bad label name at column %d" % (i + 1))
        name = m.group(0)
        if name.startswith("__"):
            raise Bad("label name %s is reserved" % name)
        if name in labels:
            raise Bad("label %s twice" % name)
        i = m.end()
        if s[i:i + 2] != '="':
            raise Bad("label %s: expected =\"" % name)
        i += 2
        j = i
        while True:
            if j >= len(s):
                raise Bad("label %s: value not closed" % name)
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == '"':
                break
            j += 1
        labels[name] = unescape(s[i:j], '\\"n')
        i = j + 1
        if i < len(s) and s[i] == ",":
            i += 1
        elif i < len(s) and s[i] == "}":
            continue
        else:
            raise Bad("label %s: expected , or }" % name)


def check_value(v):
    if v in ("NaN", "+Inf", "-Inf", "Inf"):
        return
    if not FLOAT.match(v):
        raise Bad("bad value %r" % v)


def family_of(name, types):
    for suffix in ("_bucket", "_count", "_sum"):
        base = name[:-len(suffix)] if name.endswith(suffix) else None
        if base and types.get(base) in ("histogram", "summary"):
            return base
    return name


def check(text, prefix=None, want_labels=(), counters_total=False):
    helps, types, seen_series = {}, {}, set()
    families_done, current, sampled = set(), None, set()
    if text and not text.endswith("\n"):
        raise Bad("the text does not end with a newline")
    for n, line in enumerate(text.split("\n")[:-1], 1):
        try:
            if line.strip() == "":
                continue
            if line.startswith("#"):
                w = line.split(" ", 3)
                if len(w) >= 3 and w[1] in ("HELP", "TYPE"):
                    name = w[2]
                    if not NAME.fullmatch(name):
                        raise Bad("bad metric name %r" % name)
                    if w[1] == "HELP":
                        if name in helps:
                            raise Bad("second HELP for %s" % name)
                        helps[name] = unescape(w[3] if len(w) > 3 else "", "\\n")
                    else:
                        if name in types:
                            raise Bad("second TYPE for %s" % name)
                        if len(w) != 4 or w[3] not in TYPES:
                            raise Bad("bad TYPE line")
                        if name in sampled:
                            raise Bad("TYPE for %s after its samples" % name)
                        types[name] = w[3]
                continue
            m = NAME.match(line)
            if not m:
                raise Bad("bad metric name")
            name, i = m.group(0), m.end()
            labels = {}
            if i < len(line) and line[i] == "{":
                labels, i = parse_labels(line, i)
            rest = line[i:]
            if not rest.startswith(" "):
                raise Bad("expected a space before the value")
            parts = rest.strip(" ").split(" ")
            if len(parts) not in (1, 2) or "  " in rest.strip(" ") or "\t" in rest:
                raise Bad("expected value [timestamp]")
            check_value(parts[0])
            if len(parts) == 2 and not re.fullmatch(r"-?\d+", parts[1]):
                raise Bad("bad timestamp %r" % parts[1])
            fam = family_of(name, types)
            if fam != current:
                if fam in families_done:
                    raise Bad("samples of %s are not together" % fam)
                if current:
                    families_done.add(current)
                current = fam
            sampled.add(fam)
            key = (name, tuple(sorted(labels.items())))
            if key in seen_series:
                raise Bad("series %s%s twice" % (name, labels))
            seen_series.add(key)
            if prefix is not None:
                if not name.startswith(prefix):
                    raise Bad("%s does not start with %s" % (name, prefix))
                if fam not in helps or fam not in types:
                    raise Bad("%s has no HELP or TYPE line before it" % fam)
            for k, v in want_labels:
                if labels.get(k) != v:
                    raise Bad("label %s is %r, not %r" % (k, labels.get(k), v))
        except Bad as e:
            raise Bad("line %d: %s: %s" % (n, e, line))
    if counters_total:
        for name, t in types.items():
            if t == "counter" and not name.endswith("_total"):
                raise Bad("counter %s does not end in _total" % name)
    if not seen_series:
        raise Bad("no samples")
    return len(seen_series)


GOOD = '# HELP a_total x\\\\y\\n\n# TYPE a_total counter\na_total{image="p\\"q\\\\r\\ns"} 3\n'
BAD = [
    "# TYPE a counter\na{x=\"1\"} 1\n# TYPE a gauge\n",        # second TYPE
    "a 1\n# TYPE a gauge\n",                                   # TYPE after samples
    "a{x=\"\\q\"} 1\n",                                        # bad escape
    "1a 1\n",                                                  # bad name
    "a{x=\"1\"} one\n",                                        # bad value
    "a 1\nb 1\na 2\n",                                         # interleaved
    "a{x=\"1\"} 1\na{x=\"1\"} 2\n",                            # same series twice
    "a{__x=\"1\"} 1\n",                                        # reserved label
    "a{x=\"1} 1\n",                                            # unclosed value
    "a 1",                                                     # no final newline
    "# HELP a a\\x\n# TYPE a gauge\na 1\n",                    # bad HELP escape
]


def self_test():
    n = check(GOOD, "a", [("image", 'p"q\\r\ns')], True)
    assert n == 1
    for i, b in enumerate(BAD):
        try:
            check(b)
        except Bad:
            continue
        sys.exit("self-test: bad input %d was accepted: %r" % (i, b))
    for args in (("b", []), ("a", [("image", "other")])):
        try:
            check(GOOD, args[0], args[1])
        except Bad:
            continue
        sys.exit("self-test: a wrong prefix or label was accepted: %r" % (args,))
    try:
        check(GOOD.replace("a_total", "a"), counters_total=True)
        sys.exit("self-test: a counter without _total was accepted")
    except Bad:
        pass
    print("self-test ok")


def main():
    args = sys.argv[1:]
    if args == ["--self-test"]:
        self_test()
        return
    path, prefix, labels, ct = args[0], None, [], False
    i = 1
    while i < len(args):
        if args[i] == "--prefix":
            prefix = args[i + 1]
            i += 2
        elif args[i] == "--label":
            k, _, v = args[i + 1].partition("=")
            labels.append((k, v))
            i += 2
        elif args[i] == "--counters-total":
            ct = True
            i += 1
        else:
            sys.exit("unknown argument %s" % args[i])
    text = open(path, encoding="utf-8").read()
    try:
        n = check(text, prefix, labels, ct)
    except Bad as e:
        print("%s: %s" % (path, e))
        sys.exit(1)
    print("%s: %d series, format ok" % (path, n))


if __name__ == "__main__":
    main()
