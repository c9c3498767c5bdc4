// MathJax for the formulas of the method pages (pymdownx.arithmatex, generic mode). The site loads
// MathJax from the theme's page only when a page has math; offline it shows the LaTeX source.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" }
};
