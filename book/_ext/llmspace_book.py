"""Sphinx glue for the llmspace book: keep the offline page free of browser-console errors, and give every
page social metadata (Open Graph / Twitter card meta tags; sphinxext-opengraph is not a dependency)."""
import html
import re

DESCRIPTION = ("An online book and course on making large language models fit: sparse storage, training "
               "and serving memory, quantization, pruning, distillation and storage I/O, with graded exercises.")


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


def _social_meta(app, pagename, templatename, context, doctree):
    # Open Graph + Twitter card tags in <head>; relative URLs only (the book is served from any host or
    # opened from disk, so no absolute og:url is invented). The favicon doubles as the preview image.
    title = re.sub(r"<[^>]+>", "", context.get("title") or "") or app.config.project
    site = app.config.html_title or app.config.project
    tags = {"og:title": html.unescape(title), "og:site_name": site, "og:type": "website",
            "og:description": DESCRIPTION, "twitter:card": "summary"}
    meta = "".join(f'<meta property="{k}" content="{html.escape(v, quote=True)}" />\n' for k, v in tags.items())
    meta += f'<meta name="description" content="{html.escape(DESCRIPTION, quote=True)}" />\n'
    context["metatags"] = context.get("metatags", "") + meta


def setup(app):
    # html-page-context is emitted "first result wins": run first, or a theme handler may end the chain.
    app.connect("html-page-context", _dedupe_scripts, priority=1)
    app.connect("html-page-context", _social_meta)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
