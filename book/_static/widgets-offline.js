// Loaded between require.js and the widget manager (nb_ipywidgets_js in _config.yml).

// The manager (@jupyter-widgets/html-manager, an AMD module) loads its icon fonts from its own
// module URL; point that module at the copy in _static/vendor, not at a folder beside the page.
(function () {
  var staticRoot = document.currentScript.src.replace(/[^/]*$/, "");  // .../_static/
  require.config({paths: {"@jupyter-widgets/html-manager/dist": staticRoot + "vendor/html-manager"}});
})();

// The manager typesets widget labels with MathJax 2's
// MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]); the book loads MathJax 3, which has
// MathJax.typesetPromise instead. MathJax 3 replaces the global MathJax object when its
// deferred script runs, before DOMContentLoaded; the widgets render at the load event after it.
document.addEventListener("DOMContentLoaded", function () {
  var mj = window.MathJax;
  if (!mj || !mj.startup || mj.Hub) return;  // no MathJax 3 on this page, or already MathJax 2
  mj.Hub = {
    Queue: function (job) {
      var element = job[2];
      return mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
    }
  };
});
