#!/usr/bin/env python3
"""Renders a chat template (Jinja) the way Hugging Face transformers' apply_chat_template does,
as the reference our C++ ChatTemplate::render is tested against (tests/tokenizer/
test_chat_template_jinja.cpp).

    render-chat-template.py TEMPLATE_FILE < contexts.json > rendered.json

stdin: a JSON array of contexts, each the variables of one render, e.g.
    {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true,
     "enable_thinking": false, "bos_token": "<|begin_of_text|>"}
stdout: a JSON array of the rendered strings, in the same order.

The environment matches transformers': a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` filter that keeps non-ASCII text, and
the raise_exception / strftime_now globals; `tools` and `documents` are passed as None when
the context does not set them. A template that raises exits with status 1 and the message.
"""
import datetime
import json
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: render-chat-template.py TEMPLATE_FILE < contexts.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        source = f.read()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(source)
    contexts = json.load(sys.stdin)
    out = []
    for i, ctx in enumerate(contexts):
        variables = {"tools": None, "documents": None}
        variables.update(ctx)
        try:
            out.append(template.render(**variables))
        except jinja2.exceptions.TemplateError as e:
            sys.exit(f"{sys.argv[1]}: context {i}: {e}")
    json.dump(out, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
