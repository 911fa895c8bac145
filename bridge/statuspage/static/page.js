// Asks before a Delete. The page works the same without it.
document.addEventListener("submit", function (e) {
  var question = e.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    e.preventDefault();
  }
});
