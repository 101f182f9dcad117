"""The /lite page: a Bottle SimpleTemplate (a module, so that it installs with the others).

Rendered by lite_app's /lite route; SimpleTemplate escapes everything it
shows.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lite</title>
<link rel="icon" href="data:,">
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }
h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #ddd; }
.num { font-variant-numeric: tabular-nums; text-align: right; }
button { font: inherit; padding: .2rem .9rem; cursor: pointer; }
.note { color: #666; font-size: .9rem; }
</style>
</head>
<body>
<h1>lite</h1>
<p>Counters kept in SQLite, shared by every server process.</p>
% if counters:
<table id="counters">
<tr><th>counter</th><th class="num">value</th><th></th></tr>
% for name, value in counters:
<tr>
  <td><a href="/lite/get?counter={{name}}">{{name}}</a></td>
  <td class="num" id="value-{{name}}">{{value}}</td>
  <td><form method="post" action="/lite">
    <input type="hidden" name="counter" value="{{name}}">
    <button type="submit" id="inc-{{name}}">+1</button>
  </form></td>
</tr>
% end
</table>
% else:
<p>No counters yet: config.ini has not been applied.</p>
% end
% if version:
<p class="note" id="config-version">Config version {{version["fingerprint"]}},
applied {{version["applied"]}} by process {{version["applied_by"]}}.</p>
% end

<h2>Live figures</h2>
<table id="figures">
% for label, key, value in stats:
<tr><td>{{label}}</td><td class="num" data-stat="{{key}}">{{value}}</td></tr>
% end
</table>
<p class="note">From <a href="/lite/stats">/lite/stats</a> (and
<a href="/metrics">/metrics</a>), summed over every server process since the
server started, those that have exited included;
<span data-stat="process_count">{{process_count}}</span> serve now;
<span id="refreshed">as of loading this page</span>.
Health: <a href="/lite/health">/lite/health</a>. Served by process {{pid}}.</p>
<script>
// Every 2 s, fetch this page again and take its numbers and values: the
// server formats each number, in one place.
(function () {
  function refresh() {
    fetch("/lite", {cache: "no-store"}).then(function (r) {
      return r.ok ? r.text() : Promise.reject(r.status);
    }).then(function (html) {
      var fresh = new DOMParser().parseFromString(html, "text/html");
      document.querySelectorAll("[data-stat], [id^='value-']").forEach(function (cell) {
        var selector = cell.id ? "#" + CSS.escape(cell.id)
          : "[data-stat='" + cell.getAttribute("data-stat") + "']";
        var update = fresh.querySelector(selector);
        if (update) cell.textContent = update.textContent;
      });
      document.getElementById("refreshed").textContent =
        "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    }).catch(function () {
      document.getElementById("refreshed").textContent = "could not update";
    });
  }
  setInterval(refresh, 2000);
})();
</script>
</body>
</html>
"""
