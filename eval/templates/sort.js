// Sortable tables of the HTML report (eval/html_report.py): click a header to sort on the cells' data-value
// (numbers numerically, other text alphabetically, empty cells last either way); click again to reverse.
(function () {
  "use strict";
  function key(cell) {
    var text = cell.getAttribute("data-value");
    if (text === null) text = cell.textContent.trim();
    var number = Number(text);
    return { empty: text === "", number: text !== "" && isFinite(number) ? number : null, text: text };
  }
  function compare(a, b) {
    if (a.empty || b.empty) return a.empty === b.empty ? 0 : (a.empty ? 1 : -1);
    if (a.number !== null && b.number !== null) return a.number - b.number;
    return a.text.localeCompare(b.text, undefined, { numeric: true });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, column) {
      th.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows).map(function (row) { return { row: row, key: key(row.cells[column]) }; });
        rows.sort(function (a, b) {
          if (a.key.empty || b.key.empty) return compare(a.key, b.key);  // empty last in both directions
          return descending ? compare(b.key, a.key) : compare(a.key, b.key);
        });
        rows.forEach(function (r) { body.appendChild(r.row); });
      });
    });
  });
})();
