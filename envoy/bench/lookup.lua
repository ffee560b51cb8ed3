-- Benchmark baseline: the lookup prealloc's filter does, written in Lua for
-- envoy.filters.http.lua. Cookie "prealloc=<consumer id>" (unsigned: Envoy's
-- Lua has no HMAC) -> routing table -> x-prealloc-cluster -> clearRouteCache.
-- bench replaces the ROUTES line with the table (consumer id -> cluster list).
local routes = {}
--{{ROUTES}}

local rr = 0

function envoy_on_request(handle)
  local headers = handle:headers()
  -- Like prealloc: a client never picks the cluster itself.
  headers:remove("x-prealloc-cluster")
  local cookie = headers:get("cookie")
  if cookie == nil then
    return
  end
  local id = string.match(cookie, "prealloc=([%w_-]+)")
  if id == nil then
    return
  end
  local replicas = routes[id]
  if replicas == nil then
    return
  end
  rr = rr + 1
  headers:replace("x-prealloc-cluster", replicas[(rr % #replicas) + 1])
  headers:replace("x-prealloc-consumer", id)
  handle:clearRouteCache()
end
