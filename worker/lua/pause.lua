-- pause: pause a model for every worker until a time; a pause is only ever extended.
--
-- KEYS[1] pause hash {queue}:flow:pause:{model}
-- ARGV[1] until (epoch s), ARGV[2] reason, ARGV[3] now ('' = Redis TIME)

extend_pause(KEYS[1], tonumber(ARGV[1]), ARGV[2], clock(ARGV[3]))
