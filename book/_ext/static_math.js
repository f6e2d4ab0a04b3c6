// TeX -> MathJax CHTML markup at build time (book/_ext/static_math.py drives it): the reader's browser gets
// plain HTML + CSS and the MathJax fonts, no 1.1 MiB script. Protocol: one JSON request per stdin line,
// one JSON answer per stdout line, in order.
//   {"tex": "...", "display": bool}  ->  {"html": "<mjx-container ...>"}  or  {"error": "message"}
//   {"css": true}                    ->  {"css": "..."}  (styles for the characters used since the last
//                                                          css request, then forgets them: one sheet per page)
// argv[2]: MathJax's es5 folder (the one sphinx-mathjax-offline ships).
'use strict';
const readline = require('readline');
const DIR = process.argv[2];
const FONTS = '@FONTS@';   // replaced by each page's relative path to the copied woff-v2 fonts

require(DIR + '/node-main.js').init({
  loader: {paths: {mathjax: DIR}, load: ['adaptors/liteDOM', 'input/tex', 'output/chtml'], versionWarnings: false},
  tex: {packages: {'[+]': ['ams'], '[-]': ['noundefined']}},   // an unknown macro is an error, not red text
  chtml: {fontURL: FONTS, adaptiveCSS: true},
  startup: {typeset: false},
}).then(MathJax => {
  const adaptor = MathJax.startup.adaptor;
  const out = line => process.stdout.write(JSON.stringify(line) + '\n');
  let queue = Promise.resolve();
  readline.createInterface({input: process.stdin}).on('line', line => {
    queue = queue.then(async () => {
      const req = JSON.parse(line);
      if (req.css) {
        const css = adaptor.textContent(MathJax.chtmlStylesheet());
        MathJax.startup.output.clearCache();
        return out({css});
      }
      try {
        const node = await MathJax.tex2chtmlPromise(req.tex, {display: !!req.display});
        const errors = adaptor.tags(node, 'mjx-merror');
        if (errors.length) return out({error: adaptor.getAttribute(errors[0], 'data-mjx-error') || adaptor.textContent(errors[0])});
        out({html: adaptor.outerHTML(node)});
      } catch (e) {
        out({error: String(e && e.message || e)});
      }
    });
  });
}).catch(e => { console.error(e); process.exit(1); });
