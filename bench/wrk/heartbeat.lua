-- Heartbeat one warm lease: wrk -s heartbeat.lua URL -- LEASE_ID
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua"
local common = require("common")
local req

function init(args)
   req = wrk.format("POST", "/v1/leases/" .. args[1] .. "/heartbeat", common.headers())
end

function request()
   return req
end

done = common.done
