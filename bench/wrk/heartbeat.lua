-- Heartbeat warm leases, one after the other: wrk -s heartbeat.lua URL -- ID[,ID...]
-- (as many Airflow tasks would, each heartbeating its own lease).
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua"
local common = require("common")
local reqs, n = {}, 0

function init(args)
   for id in string.gmatch(args[1], "[^,]+") do
      table.insert(reqs, wrk.format("POST", "/v1/leases/" .. id .. "/heartbeat", common.headers()))
   end
end

function request()
   n = n % #reqs + 1
   return reqs[n]
end

done = common.done
