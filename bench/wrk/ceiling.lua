-- The minimal FastAPI endpoint (bench/ceiling.py), with the same headers a lease call sends.
package.path = package.path .. ";" .. debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "?.lua"
local common = require("common")
local req

function init(args)
   req = wrk.format("GET", "/ceiling", common.headers())
end

function request()
   return req
end

done = common.done
