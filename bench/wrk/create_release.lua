-- Create a lease on a warm context, then release it: wrk -s create_release.lua URL -- PROFILE
-- Every created lease's id (its Location header) is queued, and the next request a
-- connection sends releases the oldest queued lease; with nothing queued it creates one.
-- So creates and releases alternate, and both count as requests.
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua"
local common = require("common")
local create, headers
local queue, first, last = {}, 1, 0

function init(args)
   headers = common.headers()
   local body = '{"profile": "' .. args[1] .. '", "ttl_s": 600, "holder": {"task_id": "wrk"}}'
   create = wrk.format("POST", "/v1/leases", headers, body)
end

function request()
   if first <= last then
      local location = queue[first]
      queue[first] = nil
      first = first + 1
      return wrk.format("DELETE", location, headers)
   end
   return create
end

function response(status, hdrs, body)
   if status == 201 then
      last = last + 1
      queue[last] = hdrs["Location"] or hdrs["location"]
   end
end

done = common.done
