"""Sphinx glue for the llmspace book: keep the offline page free of browser-console errors."""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    # Sphinx 7.4 emits body scripts added after builder init twice (e.g. THEBE_JS_URL); a second
    # `const` declaration is a console error. Keep the first of each identical script.
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # identity = file + attributes (an inline script's code is its 'body' attribute); the duplicate
        # differs only in priority and in filename None vs ""
        key = (getattr(script, "filename", str(script)) or "",
               tuple(sorted((k, str(v)) for k, v in getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: handlers that run later (mathjax) append to this same list


def setup(app):
    # html-page-context is emitted "first result wins": run first, or a theme handler may end the chain.
    app.connect("html-page-context", _dedupe_scripts, priority=1)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
