"""Sphinx glue for the llmspace book: keep the offline page free of browser-console errors."""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    # Sphinx 7.4 emits body scripts added after builder init twice (e.g. THEBE_JS_URL); a second
    # `const` declaration is a console error. Keep the first of each identical script.
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = (str(script), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
