-- Run once by the mysql image when its volume is first created, after it
-- made the 'edge' user and database (MYSQL_USER/MYSQL_DATABASE).
-- The end-to-end tests create and drop their own uniquely named databases,
-- as with tests/services/up (MariaDB), so 'edge' may do so too.
-- Local development only.
GRANT ALL PRIVILEGES ON *.* TO 'edge'@'%';
